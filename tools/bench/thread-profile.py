#!/usr/bin/env python3
"""Where one submission's time goes, thread by thread (F12's small rows).

Starts a vgpud with one vGPU, then for each path runs one guest of vgpu-bench's concurrency
worker mode (`vgpu-bench --worker PATH`: small dispatches, copy 4 KiB, each waited for) and
reads every thread of the supervisor, the worker and the guest from /proc before "go" and
after the last submission: CPU time (schedstat, ns) and context switches, per submission.
The paths run alternately, `--rounds` times each, on the same vGPU.

    tools/bench/thread-profile.py [--bin build/tools] [--iters 4000] [--rounds 2]
                                  [--paths mediated,remoting] [-- VGPUD_ARGS...]

Threads are unnamed (the workers' sandbox allows no renaming after start-up), so they are
listed by thread id; a worker's threads are numbered in the order it made them, and the
ones that appear only with one path are that path's (the executor's threads appear with
the first mediated connection). VGPUD_ARGS go to vgpud (default: --time-granularity-us 0,
as the study's daemons run).
"""
import argparse
import collections
import glob
import os
import subprocess
import sys
import tempfile
import time

UUID = "b0b0b0b0-0000-4000-8000-00000000be0c"  # vgpu-bench's first guest


def threads(pid):
    """{tid: (cpu_ns, context_switches)} of one process; empty once it is gone."""
    out = {}
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            cpu_ns = int(open(f"{task}/schedstat").read().split()[0])
            cs = 0
            for line in open(f"{task}/status"):
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    cs += int(line.split()[1])
            out[int(task.rsplit("/", 1)[1])] = (cpu_ns, cs)
        except (OSError, ValueError, IndexError):
            pass
    return out


def processes(comm):
    found = []
    for p in glob.glob("/proc/[0-9]*/comm"):
        try:
            if open(p).read().strip() == comm:
                found.append(int(p.split("/")[2]))
        except OSError:
            pass
    return found


def snapshot(groups):
    return {(label, tid): v for label, pids in groups.items() for pid in pids for tid, v in threads(pid).items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="build/tools", help="folder with vgpud, vgpud-worker and vgpu-bench")
    ap.add_argument("--iters", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--paths", default="mediated,remoting")
    ap.add_argument("vgpud_args", nargs="*", default=["--time-granularity-us", "0"])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vgpu-thread-profile-") as d:
        daemon = subprocess.Popen([f"{a.bin}/vgpud", "--runtime-dir", d, "--log-level", "error",
                                   "--vgpu", f"{UUID}:small", *a.vgpud_args])
        try:
            sock, remote = f"{d}/{UUID}.sock", f"{d}/{UUID}.remote.sock"
            deadline = time.time() + 30
            while not os.path.exists(f"{d}/control.sock"):
                if time.time() > deadline or daemon.poll() is not None:
                    sys.exit("vgpud did not come up")
                time.sleep(0.05)
            for _ in range(a.rounds):
                for path in a.paths.split(","):
                    run(a, path, sock, remote, daemon.pid)
        finally:
            daemon.terminate()
            daemon.wait()


def run(a, path, sock, remote, daemon_pid):
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    guest = subprocess.Popen([f"{a.bin}/vgpu-bench", "--worker", path, "--socket", sock, "--remote-socket", remote,
                              "--iters", str(a.iters), "--ready-fd", str(ready_w), "--go-fd", str(go_r),
                              "--guest-ram-mib", "32"], pass_fds=(ready_w, go_r))
    os.close(ready_w)
    os.close(go_r)
    if os.read(ready_r, 1) != b"r":
        sys.exit(f"the {path} guest did not start")
    groups = {"supervisor": [daemon_pid], "worker": [p for p in processes("vgpud-worker")], "guest": [guest.pid]}
    before = snapshot(groups)
    t0 = time.monotonic()
    os.write(go_w, b"g")
    # The guest's last reading before it exits: it writes its CPU record, then checks and exits.
    after = before
    while guest.poll() is None:
        after = snapshot(groups)
        time.sleep(0.01)
    wall_us = (time.monotonic() - t0) * 1e6 / a.iters
    os.close(ready_r)
    os.close(go_w)
    print(f"== {path}: {a.iters} submissions, {wall_us:.1f} us each (exit {guest.returncode})")
    totals = collections.Counter()
    for key in sorted(after):
        cpu0, cs0 = before.get(key, (0, 0))
        cpu, cs = after[key][0] - cpu0, after[key][1] - cs0
        if cpu <= 0 and cs <= 0:
            continue
        label, tid = key
        totals[label] += cpu
        print(f"   {label:10s} thread {tid:>7}  {cpu / 1e3 / a.iters:7.1f} us CPU  {cs / a.iters:5.2f} switches  per submission")
    print("   total CPU per submission: " + ", ".join(f"{k} {v / 1e3 / a.iters:.1f} us" for k, v in sorted(totals.items())))


if __name__ == "__main__":
    main()
