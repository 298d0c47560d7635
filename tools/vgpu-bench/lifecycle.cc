#include "tools/vgpu-bench/lifecycle.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>

#include <fmt/format.h>

#include "vfio_user/client.h"

namespace vg::bench {
namespace {

using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;
double Us(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }
int MsLeft(Clock::time_point deadline) {
  return static_cast<int>(
      std::max<int64_t>(0, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count()));
}

// One control request, one reply line, on a fresh connection (as vgpuctl does), all of it
// bounded by timeout_ms. A refusal ({"ok": false, ...}) is an error carrying the daemon's words.
Result<Json> Control(const std::string& path, const Json& req, int timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  VG_INVALID_IF(path.empty() || path.size() >= sizeof(a.sun_path), "control socket path '{}' too long", path);
  std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  VG_ERROR_IF(!fd.Valid(), Errc::kIo, "socket: {}", std::strerror(errno));
  VG_ERROR_IF(::connect(fd.Get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0, Errc::kIo,
              "connect {}: {}", path, std::strerror(errno));
  const std::string line = req.dump() + "\n";
  size_t done = 0;
  while (done < line.size()) {
    pollfd p{fd.Get(), POLLOUT, 0};
    int pr = ::poll(&p, 1, MsLeft(deadline));
    if (pr < 0 && errno == EINTR) continue;
    VG_ERROR_IF(pr == 0, Errc::kTimeout, "control {}: request not taken within {} ms", req.value("op", ""),
                timeout_ms);
    ssize_t n = ::send(fd.Get(), line.data() + done, line.size() - done, MSG_NOSIGNAL);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    VG_ERROR_IF(n <= 0, Errc::kIo, "control send: {}", std::strerror(errno));
    done += static_cast<size_t>(n);
  }
  std::string in;
  char buf[4096];
  while (in.find('\n') == std::string::npos) {
    pollfd p{fd.Get(), POLLIN, 0};
    int pr = ::poll(&p, 1, MsLeft(deadline));
    if (pr < 0 && errno == EINTR) continue;
    VG_ERROR_IF(pr == 0, Errc::kTimeout, "control {}: no reply within {} ms", req.value("op", ""), timeout_ms);
    ssize_t n = ::read(fd.Get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    VG_ERROR_IF(n <= 0, Errc::kIo, "control {}: connection closed without a reply", req.value("op", ""));
    in.append(buf, static_cast<size_t>(n));
  }
  Json reply = Json::parse(in.substr(0, in.find('\n')), nullptr, /*allow_exceptions=*/false);
  VG_ERROR_IF(reply.is_discarded() || !reply.is_object() || !reply.contains("ok"), Errc::kBadMessage,
              "control {}: malformed reply", req.value("op", ""));
  if (reply["ok"] != true) {
    // {"ok": false, "error": "<Errc name>", "message": "..."} (vgpud/control.cc ErrorLine)
    const std::string code = reply.value("error", std::string("?")), message = reply.value("message", std::string());
    return MakeError(Errc::kInternal, "control {} refused: {}: {}", req.value("op", ""), code, message);
  }
  return reply;
}

// "Name:   1234 kB" lines of a /proc file, in bytes.
std::map<std::string, uint64_t> ReadKbFields(const std::string& file) {
  std::map<std::string, uint64_t> out;
  std::ifstream f(file);
  std::string line;
  while (std::getline(f, line)) {
    size_t colon = line.find(':');
    if (colon == std::string::npos || line.size() < 3 || line.compare(line.size() - 3, 3, " kB") != 0) continue;
    unsigned long long kb = 0;
    if (std::sscanf(line.c_str() + colon + 1, " %llu", &kb) == 1) out[line.substr(0, colon)] = kb << 10;
  }
  return out;
}

ProcessMemory ReadMemory(pid_t pid) {
  ProcessMemory m;
  m.pid = pid;
  auto status = ReadKbFields(fmt::format("/proc/{}/status", pid));
  m.rss_bytes = status["VmRSS"];
  auto rollup = ReadKbFields(fmt::format("/proc/{}/smaps_rollup", pid));
  m.pss_bytes = rollup["Pss"];
  m.pss_anon_bytes = rollup["Pss_Anon"];
  m.pss_file_bytes = rollup["Pss_File"];
  m.pss_shmem_bytes = rollup["Pss_Shmem"];
  return m;
}

Json Req(const char* op, const std::string& uuid) { return Json{{"op", op}, {"uuid", uuid}}; }

struct Started {
  std::string uuid;
  std::string socket;
};

Result<Started> StartVgpu(const LifecycleOptions& o, double* reply_us) {
  const std::string uuid = Uuid::Random().ToString();
  auto t0 = Clock::now();
  VG_TRY_ASSIGN(Json r, Control(o.control, Json{{"op", "start"}, {"uuid", uuid}, {"type", o.type}},
                                o.control_timeout_ms));
  *reply_us = Us(Clock::now() - t0);
  VG_ERROR_IF(!r.contains("socket") || !r["socket"].is_string(), Errc::kBadMessage, "start {}: no socket in {}",
              uuid, r.dump());
  return Started{uuid, r["socket"].get<std::string>()};
}

// Usable = a vfio-user client connected to the returned socket and had VERSION answered,
// what every VMM does first (the guest library's Device::Open then DMA_MAPs its RAM).
Result<std::unique_ptr<vfio_user::Client>> Attach(const LifecycleOptions& o, const std::string& socket) {
  VG_TRY_ASSIGN(auto c, vfio_user::Client::Connect(socket, o.vfio_timeout_ms));
  vfio_user::ClientOptions co;
  co.timeout_ms = o.vfio_timeout_ms;
  VG_TRY_CTX(c->Negotiate(co), "VERSION on {}", socket);
  return c;
}

Result<Json> ShowWorker(const LifecycleOptions& o, const std::string& uuid) {
  VG_TRY_ASSIGN(Json s, Control(o.control, Req("show", uuid), o.control_timeout_ms));
  VG_ERROR_IF(!s.contains("worker") || !s["worker"].is_object(), Errc::kBadMessage, "show {}: no worker object",
              uuid);
  return s["worker"];
}

template <class T>
T NumberOr(const Json& j, const char* key, T fallback) {
  return j.contains(key) && j[key].is_number() ? j[key].get<T>() : fallback;
}

// One measured cycle: start, attach (VERSION), show, detach, stop.
struct Cycle {
  double start_reply_us = 0, start_to_version_us = 0, spawn_to_ready_us = 0, stop_reply_us = 0, stop_to_exit_us = 0;
};

Result<Cycle> RunCycle(const LifecycleOptions& o) {
  Cycle c;
  auto t0 = Clock::now();
  VG_TRY_ASSIGN(Started s, StartVgpu(o, &c.start_reply_us));
  // From here on the vGPU is stopped whatever fails, so a failed cycle leaves nothing behind.
  auto stop_quietly = [&] { (void)Control(o.control, Req("stop", s.uuid), o.control_timeout_ms); };
  auto client = Attach(o, s.socket);
  if (!client.ok()) {
    stop_quietly();
    return MakeError(client.error().code, "start {}: not usable: {}", s.uuid, client.error().what);
  }
  c.start_to_version_us = Us(Clock::now() - t0);
  auto w = ShowWorker(o, s.uuid);
  if (!w.ok()) {
    stop_quietly();
    return Unexpected{w.error()};
  }
  c.spawn_to_ready_us = NumberOr<double>(*w, "start_latency_us", 0);
  if (c.spawn_to_ready_us <= 0) {
    stop_quietly();
    return MakeError(Errc::kBadMessage, "show {}: worker.start_latency_us missing or 0", s.uuid);
  }
  // A pidfd taken while the worker surely runs (it just answered VERSION) cannot name a
  // recycled pid; it polls readable once the worker has exited. The stop reply comes when
  // the supervisor has sent SIGTERM, not when the worker is gone: (e) is the latter.
  const pid_t pid = NumberOr<pid_t>(*w, "pid", 0);
  UniqueFd pidfd(pid > 0 ? static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)) : -1);
  if (!pidfd.Valid()) {
    stop_quietly();
    return MakeError(Errc::kIo, "worker {} of {}: pidfd_open: {}", pid, s.uuid, std::strerror(errno));
  }
  client->reset();  // the VM goes away first, as it does before a vGPU is stopped
  auto t1 = Clock::now();
  VG_TRY(Control(o.control, Req("stop", s.uuid), o.control_timeout_ms));
  c.stop_reply_us = Us(Clock::now() - t1);
  const auto deadline = t1 + std::chrono::milliseconds(o.exit_timeout_ms);
  for (;;) {
    pollfd p{pidfd.Get(), POLLIN, 0};
    int pr = ::poll(&p, 1, MsLeft(deadline));
    if (pr < 0 && errno == EINTR) continue;
    VG_ERROR_IF(pr <= 0, Errc::kTimeout, "worker {} of {} still runs {} ms after stop", pid, s.uuid,
                o.exit_timeout_ms);
    break;
  }
  c.stop_to_exit_us = Us(Clock::now() - t1);
  return c;
}

MeanMax Of(const std::vector<ProcessMemory>& v, double (*get)(const ProcessMemory&)) {
  MeanMax m;
  for (const auto& p : v) {
    m.mean += get(p) / static_cast<double>(v.size());
    m.max = std::max(m.max, get(p));
  }
  return m;
}

void MeasureIdle(const LifecycleOptions& o, LifecycleReport& r) {
  struct Live {
    Started s;
    std::unique_ptr<vfio_user::Client> client;
  };
  std::vector<Live> live;
  for (int i = 0; i < o.idle_workers; ++i) {
    double ignored = 0;
    auto s = StartVgpu(o, &ignored);
    if (!s.ok()) {
      r.errors.push_back(fmt::format("idle worker {} of {}: start failed: {}", i + 1, o.idle_workers,
                                     s.error().ToString()));
      continue;
    }
    auto c = Attach(o, s->socket);
    if (!c.ok()) {
      r.errors.push_back(fmt::format("idle worker {}: {}", s->uuid, c.error().ToString()));
      (void)Control(o.control, Req("stop", s->uuid), o.control_timeout_ms);
      continue;
    }
    live.push_back({*s, std::move(*c)});
  }
  for (const Live& l : live) {
    auto w = ShowWorker(o, l.s.uuid);
    if (!w.ok()) {
      r.errors.push_back(fmt::format("idle worker {}: {}", l.s.uuid, w.error().ToString()));
      continue;
    }
    const pid_t pid = NumberOr<pid_t>(*w, "pid", 0);
    if (pid <= 0) {
      r.errors.push_back(fmt::format("idle worker {}: show has no worker pid", l.s.uuid));
      continue;
    }
    ProcessMemory m = ReadMemory(pid);
    if (m.rss_bytes == 0 || m.pss_bytes == 0) {
      r.errors.push_back(fmt::format("idle worker {} (pid {}): /proc/{}/status or smaps_rollup unreadable", l.s.uuid,
                                     pid, pid));
      continue;
    }
    const Json usage = w->value("usage", Json::object());
    m.show_rss_bytes = NumberOr<uint64_t>(usage, "rss_bytes", 0);
    m.fds = NumberOr<uint32_t>(usage, "fds", 0);
    m.threads = NumberOr<uint32_t>(usage, "threads", 0);
    r.idle.push_back(m);
  }
  if (o.supervisor > 0) r.supervisor = ReadMemory(o.supervisor);
  if (o.supervisor > 0 && r.supervisor.rss_bytes == 0)
    r.errors.push_back(fmt::format("supervisor (pid {}): /proc/{}/status unreadable", o.supervisor, o.supervisor));
  for (Live& l : live) {
    l.client.reset();
    if (auto s = Control(o.control, Req("stop", l.s.uuid), o.control_timeout_ms); !s.ok())
      r.errors.push_back(fmt::format("idle worker {}: {}", l.s.uuid, s.error().ToString()));
  }
  r.rss = Of(r.idle, [](const ProcessMemory& p) { return static_cast<double>(p.rss_bytes); });
  r.pss = Of(r.idle, [](const ProcessMemory& p) { return static_cast<double>(p.pss_bytes); });
  r.pss_anon = Of(r.idle, [](const ProcessMemory& p) { return static_cast<double>(p.pss_anon_bytes); });
  r.pss_shmem = Of(r.idle, [](const ProcessMemory& p) { return static_cast<double>(p.pss_shmem_bytes); });
  r.fds = Of(r.idle, [](const ProcessMemory& p) { return static_cast<double>(p.fds); });
  r.threads = Of(r.idle, [](const ProcessMemory& p) { return static_cast<double>(p.threads); });
}

}  // namespace

Result<nlohmann::json> ControlRequest(const std::string& path, const nlohmann::json& req, int timeout_ms) {
  return Control(path, req, timeout_ms);
}

Result<Shown> ShowVgpu(const std::string& control, const std::string& uuid) {
  VG_TRY_ASSIGN(nlohmann::json r, Control(control, nlohmann::json{{"op", "show"}, {"uuid", uuid}}, 10000));
  Shown s;
  s.state = r.value("state", std::string());
  if (r.contains("scheduler") && r["scheduler"].is_object()) {
    const nlohmann::json& sc = r["scheduler"];
    s.scheduling = sc.value("scheduling", std::string());
    s.weight = sc.value("weight", 0.0);
    s.grants = sc.value("grants", uint64_t{0});
    s.preemptions = sc.value("preemptions", uint64_t{0});
    s.used_ms = sc.value("used_ms", 0.0);
    s.wait_ms = sc.value("wait_ms", 0.0);
    s.charged_ms = sc.value("charged_ms", 0.0);
    s.sched_state = sc.value("state", std::string());
  }
  if (r.contains("counters") && r["counters"].is_object()) {
    s.gpu_time_ns = r["counters"].value("gpu_time_ns", uint64_t{0});
    s.queue_wait_ns = r["counters"].value("queue_wait_ns", uint64_t{0});
  }
  return s;
}

LifecycleReport MeasureLifecycle(const LifecycleOptions& o) {
  LifecycleReport r;
  r.ran = true;
  r.type = o.type;
  r.requested_cycles = o.cycles;
  r.warmup = o.warmup;
  r.idle_requested = o.idle_workers;
  std::vector<double> start_reply, start_version, ready, stop, exited;
  int consecutive_failures = 0;
  for (int i = 0; i < o.warmup + o.cycles; ++i) {
    const bool warm = i < o.warmup;
    if (o.progress)
      std::fprintf(stderr, "\rvgpu-bench: lifecycle cycle %d/%d%s   ", i + 1, o.warmup + o.cycles,
                   warm ? " (warm-up)" : "");
    auto c = RunCycle(o);
    if (!c.ok()) {
      r.errors.push_back(fmt::format("cycle {}{}: {}", i + 1, warm ? " (warm-up)" : "", c.error().ToString()));
      // A daemon that is gone fails every cycle at once; three in a row is enough to say so.
      if (++consecutive_failures >= 3) {
        r.errors.push_back(fmt::format("{} cycles in a row failed: the remaining {} not attempted",
                                       consecutive_failures, o.warmup + o.cycles - i - 1));
        break;
      }
      continue;
    }
    consecutive_failures = 0;
    if (warm) continue;
    ++r.succeeded_cycles;
    start_reply.push_back(c->start_reply_us);
    start_version.push_back(c->start_to_version_us);
    ready.push_back(c->spawn_to_ready_us);
    stop.push_back(c->stop_reply_us);
    exited.push_back(c->stop_to_exit_us);
  }
  if (o.progress) std::fprintf(stderr, "\n");
  r.start_reply_us = Summarize(start_reply);
  r.start_to_version_us = Summarize(start_version);
  r.spawn_to_ready_us = Summarize(ready);
  r.stop_reply_us = Summarize(stop);
  r.stop_to_exit_us = Summarize(exited);
  if (r.succeeded_cycles < r.requested_cycles)
    r.errors.push_back(fmt::format("only {} of {} measured start/stop cycles succeeded", r.succeeded_cycles,
                                   r.requested_cycles));
  if (o.idle_workers > 0) {
    if (o.progress) std::fprintf(stderr, "vgpu-bench: lifecycle: %d idle workers\n", o.idle_workers);
    MeasureIdle(o, r);
    if (static_cast<int>(r.idle.size()) < o.idle_workers)
      r.errors.push_back(fmt::format("only {} of {} idle workers measured", r.idle.size(), o.idle_workers));
  }
  return r;
}

std::string FormatLifecycle(const LifecycleReport& r) {
  if (!r.ran) return {};
  auto ms = [](double us) { return us / 1000.0; };
  std::string out = fmt::format(
      "== lifecycle (vGPU type {}: {} start/stop cycles measured of {} requested, first {} discarded as warm-up; "
      "usable = vfio-user VERSION answered)\n{:<44} {:>5} {:>9} {:>9} {:>9}\n",
      r.type, r.succeeded_cycles, r.requested_cycles, r.warmup, "", "n", "p50 ms", "p99 ms", "max ms");
  auto row = [&](const char* name, const Stats& s) {
    out += fmt::format("{:<44} {:>5} {:>9.2f} {:>9.2f} {:>9.2f}\n", name, s.n, ms(s.p50), ms(s.p99), ms(s.max));
  };
  row("(a) start: request -> reply", r.start_reply_us);
  row("(b) start: request -> VERSION answered", r.start_to_version_us);
  row("(c) spawn -> Ready (supervisor, show)", r.spawn_to_ready_us);
  row("(d) stop: request -> reply", r.stop_reply_us);
  row("(e) stop: request -> worker exited", r.stop_to_exit_us);
  auto mib = [](double b) { return b / (1024.0 * 1024.0); };
  if (r.idle_requested > 0) {
    out += fmt::format("idle worker ({} measured of {}, one client after VERSION each)\n{:<44} {:>9} {:>9}\n",
                       r.idle.size(), r.idle_requested, "", "mean", "max");
    auto mem = [&](const char* name, const MeanMax& m) {
      out += fmt::format("{:<44} {:>9.1f} {:>9.1f}\n", name, mib(m.mean), mib(m.max));
    };
    mem("VmRSS MiB", r.rss);
    mem("Pss MiB", r.pss);
    mem("  Pss_Anon MiB", r.pss_anon);
    mem("  Pss_Shmem MiB", r.pss_shmem);
    out += fmt::format("{:<44} {:>9.1f} {:>9.0f}\n", "fds (show)", r.fds.mean, r.fds.max);
    out += fmt::format("{:<44} {:>9.1f} {:>9.0f}\n", "threads (show)", r.threads.mean, r.threads.max);
    out += fmt::format("supervisor (pid {}, with them running): VmRSS {:.1f} MiB, Pss {:.1f} MiB\n", r.supervisor.pid,
                       mib(static_cast<double>(r.supervisor.rss_bytes)), mib(static_cast<double>(r.supervisor.pss_bytes)));
  }
  for (const auto& e : r.errors) out += "LIFECYCLE PRECONDITION FAILED: " + e + "\n";
  return out;
}

Json LifecycleJson(const LifecycleReport& r) {
  auto stats = [](const Stats& s) {
    return Json{{"n", s.n}, {"p50", s.p50}, {"p90", s.p90}, {"p99", s.p99}, {"min", s.min}, {"max", s.max},
                {"mean", s.mean}};
  };
  auto memory = [](const ProcessMemory& m) {
    return Json{{"pid", m.pid},
                {"rss_bytes", m.rss_bytes},
                {"pss_bytes", m.pss_bytes},
                {"pss_anon_bytes", m.pss_anon_bytes},
                {"pss_file_bytes", m.pss_file_bytes},
                {"pss_shmem_bytes", m.pss_shmem_bytes}};
  };
  auto mm = [](const MeanMax& m) { return Json{{"mean", m.mean}, {"max", m.max}}; };
  Json j{{"type", r.type},
         {"complete", r.complete()},
         {"cycles_requested", r.requested_cycles},
         {"cycles_succeeded", r.succeeded_cycles},
         {"warmup_discarded", r.warmup},
         {"usable_means", "vfio-user VERSION answered on the returned socket"},
         {"start_reply_us", stats(r.start_reply_us)},
         {"start_to_version_us", stats(r.start_to_version_us)},
         {"spawn_to_ready_us", stats(r.spawn_to_ready_us)},
         {"stop_reply_us", stats(r.stop_reply_us)},
         {"stop_to_exit_us", stats(r.stop_to_exit_us)},
         {"errors", r.errors}};
  Json idle{{"requested", r.idle_requested},
            {"measured", r.idle.size()},
            {"rss_bytes", mm(r.rss)},
            {"pss_bytes", mm(r.pss)},
            {"pss_anon_bytes", mm(r.pss_anon)},
            {"pss_shmem_bytes", mm(r.pss_shmem)},
            {"fds", mm(r.fds)},
            {"threads", mm(r.threads)},
            {"workers", Json::array()}};
  for (const ProcessMemory& m : r.idle) {
    Json w = memory(m);
    w["show_rss_bytes"] = m.show_rss_bytes;
    w["fds"] = m.fds;
    w["threads"] = m.threads;
    idle["workers"].push_back(w);
  }
  j["idle_worker"] = idle;
  j["supervisor"] = memory(r.supervisor);
  return j;
}

std::string LifecycleCsv(const LifecycleReport& r) {
  std::string out = "metric,unit,n,p50,p99,max,mean\n";
  auto row = [&](const char* name, const Stats& s) {
    out += fmt::format("{},us,{},{:.1f},{:.1f},{:.1f},{:.1f}\n", name, s.n, s.p50, s.p99, s.max, s.mean);
  };
  row("start_reply", r.start_reply_us);
  row("start_to_version", r.start_to_version_us);
  row("spawn_to_ready", r.spawn_to_ready_us);
  row("stop_reply", r.stop_reply_us);
  row("stop_to_exit", r.stop_to_exit_us);
  auto mem = [&](const char* name, const char* unit, const MeanMax& m) {
    out += fmt::format("{},{},{},,,{:.0f},{:.1f}\n", name, unit, r.idle.size(), m.max, m.mean);
  };
  mem("idle_worker_rss", "bytes", r.rss);
  mem("idle_worker_pss", "bytes", r.pss);
  mem("idle_worker_pss_anon", "bytes", r.pss_anon);
  mem("idle_worker_pss_shmem", "bytes", r.pss_shmem);
  mem("idle_worker_fds", "count", r.fds);
  mem("idle_worker_threads", "count", r.threads);
  out += fmt::format("supervisor_rss,bytes,1,,,{},{}\n", r.supervisor.rss_bytes, r.supervisor.rss_bytes);
  out += fmt::format("supervisor_pss,bytes,1,,,{},{}\n", r.supervisor.pss_bytes, r.supervisor.pss_bytes);
  return out;
}

}  // namespace vg::bench
