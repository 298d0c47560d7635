#pragma once
// F8's lifecycle tests share these: the real daemon and vgpuctl (tests/mdev/daemon_harness.h),
// the victim tenant (tests/e2e/victim.h), guest processes forked from the test with the
// guest library, and a workload whose every result is checked against the CPU reference.

#include <doctest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <string>
#include <thread>

#include "guest/guest.h"
#include "shaders/samples.h"
#include "tests/e2e/guest_checks.h"
#include "tests/e2e/victim.h"
#include "tests/mdev/daemon_harness.h"

namespace vg::lifecycle {

using Clock = std::chrono::steady_clock;
inline double MsSince(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }
inline double SlowFactor() {
  const char* f = std::getenv("VG_SLOW_FACTOR");
  double k = f ? std::atof(f) : 1.0;
  return k > 0 ? k : 1.0;
}

inline constexpr const char* kUuidA = "f8f8f8f8-0000-4000-8000-00000000000a";
inline constexpr const char* kUuidB = "f8f8f8f8-0000-4000-8000-00000000000b";  // the victim's
inline constexpr const char* kUuidC = "f8f8f8f8-0000-4000-8000-00000000000c";

// A daemon with vGPUs started transiently through vgpuctl.
inline void StartVgpu(const mgmt::DaemonProc& d, const std::string& uuid, const std::string& type = "small") {
  mgmt::Ran r = d.Ctl({"start", "-u", uuid, "-t", type});
  REQUIRE_MESSAGE(r.code == 0, "vgpuctl start " << uuid << ": " << r.err);
}

// A clean exit (0: no worker stopped uncleanly, no sanitizer report); the log when not.
inline void CheckShutdown(mgmt::DaemonProc& d) {
  const int code = d.Shutdown();
  if (code != 0) {
    const std::string log = d.Log();
    MESSAGE("vgpud exit ", code, "; log tail:\n", log.substr(log.size() > 6000 ? log.size() - 6000 : 0));
  }
  CHECK(code == 0);
}

// `rounds` catalogue kernels through the mediated path, each result checked bit for bit.
// `stop`: checked between rounds and while waiting (a guest that must let go abandons its
// work: kBusy).
inline Result<> RunRounds(guest::Driver& drv, int rounds, uint32_t seed, const std::function<bool()>& stop = {}) {
  using namespace vg::guest;
  auto kernels = shaders::AllKernels();
  for (int r = 0; r < rounds; ++r) {
    if (stop && stop()) return MakeError(Errc::kBusy, "asked to stop");
    const auto& k = kernels[(seed + static_cast<uint32_t>(r)) % kernels.size()];
    auto s = shaders::MakeSample(k.id, 1024 + static_cast<uint32_t>(r % 5), seed + static_cast<uint32_t>(r));
    std::vector<GpuBuffer> bufs;
    std::vector<Binding> binds;
    for (size_t i = 0; i < s.bindings.size(); ++i) {
      VG_TRY_ASSIGN(GpuBuffer b, drv.Alloc(s.bindings[i].size()));
      std::memcpy(b.host.data(), s.bindings[i].data(), s.bindings[i].size());
      binds.push_back(Bind(b, e2e::AccessOf(k.bindings[i].access)));
      bufs.push_back(b);
    }
    CommandBuilder cb;
    cb.Dispatch(s.kernel, s.groups, binds, s.push);
    VG_TRY_ASSIGN(uint64_t seq, drv.Submit(cb));
    // Short waits, so that a guest told to let go notices within ~50 ms.
    for (int waited = 0;; waited += 50) {
      Result<> w = drv.Wait(seq, WaitMode::kIrq, 50);
      if (w.ok()) break;
      if (w.code() != Errc::kTimeout) return w;
      if (stop && stop()) return MakeError(Errc::kBusy, "asked to stop while waiting");
      VG_ERROR_IF(waited > 30000, Errc::kTimeout, "round {} did not complete in 30 s", r);
    }
    std::vector<std::vector<std::byte>> out;
    for (auto& b : bufs) {
      out.emplace_back(b.host.begin(), b.host.end());
      VG_TRY(drv.Free(b));
    }
    VG_TRY(shaders::CheckSample(s, out));
  }
  return Ok();
}

// A guest process forked from the test: `body` runs in the child with the guest library
// and returns its exit code; what it wants the test to know goes into `note`.
class GuestProc {
 public:
  struct Shared {
    std::atomic<uint64_t> rounds{0};
    std::atomic<int> phase{0};
    char note[512] = {};
  };
  explicit GuestProc(const std::function<int(Shared&)>& body) {
    shared_ = static_cast<Shared*>(::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
    REQUIRE(shared_ != MAP_FAILED);
    new (shared_) Shared();
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) std::_Exit(body(*shared_));
  }
  ~GuestProc() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    ::munmap(shared_, sizeof(Shared));
  }
  GuestProc(const GuestProc&) = delete;
  GuestProc& operator=(const GuestProc&) = delete;

  Shared& shared() { return *shared_; }
  std::string note() const { return shared_->note; }
  static void Note(Shared& s, const std::string& what) { std::snprintf(s.note, sizeof s.note, "%s", what.c_str()); }
  // The exit code, 128+signal, or -1 when it did not end within timeout_ms.
  int Wait(int timeout_ms) {
    if (pid_ <= 0) return code_;
    auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      int st = 0;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        code_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        return code_;
      }
      if (Clock::now() > deadline) return -1;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }
  bool WaitFor(const std::function<bool(const Shared&)>& cond, int timeout_ms) {
    auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!cond(*shared_)) {
      if (Clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return true;
  }

 private:
  Shared* shared_ = nullptr;
  pid_t pid_ = -1;
  int code_ = -1;
};

inline guest::DeviceOptions GuestOptions(const std::string& socket, int timeout_ms = 5000) {
  guest::DeviceOptions o;
  o.socket = socket;
  o.ram_size = 16 << 20;
  o.timeout_ms = timeout_ms;
  return o;
}

// Guest processes that hold a vGPU while the host stops it (F8 "Stop with a VM attached").
inline constexpr int kReleased = 10, kDisconnected = 20, kNoReq = 3, kOpenFailed = 4, kOtherError = 5;

// A guest that runs rounds until it is told to let go (REQ) or loses the device. `listen`:
// it watches REQ and releases the device (exit kReleased); else it ignores REQ and works on
// until the device goes (exit kDisconnected with the error's name in the note).
inline int WorkingGuest(GuestProc::Shared& s, const std::string& socket, bool listen) {
  auto dev = guest::Device::Open(GuestOptions(socket));
  if (!dev.ok()) {
    GuestProc::Note(s, dev.error().ToString());
    return kOpenFailed;
  }
  if (!(*dev)->release_request()) {
    GuestProc::Note(s, "the device offers no REQ");
    return kNoReq;
  }
  auto drv = guest::Driver::Create(**dev);
  if (!drv.ok()) {
    GuestProc::Note(s, drv.error().ToString());
    return kOpenFailed;
  }
  bool asked = false;
  auto stop = [&] {
    if (!asked) asked = (*dev)->ReleaseRequested();
    return listen && asked;
  };
  for (uint32_t seed = 0;; ++seed) {
    Result<> r = RunRounds(**drv, 1, seed, stop);
    if (listen && asked) {
      drv->reset();
      dev->reset();  // closes the connection: the device is released
      GuestProc::Note(s, "released");
      return kReleased;
    }
    if (!r.ok()) {
      GuestProc::Note(s, std::string(ErrcName(r.code())) + (asked ? " after REQ: " : " without REQ: ") + r.error().what);
      return r.code() == Errc::kPeerClosed ? kDisconnected : kOtherError;
    }
    s.rounds.fetch_add(1);
  }
}

}  // namespace vg::lifecycle
