// F10 frame pacing through the real daemon (docs/device-spec.md §Scan-out, "Frame pacing";
// docs/management.md "Frame pacing"): a guest process that flips as fast as it can, never
// waiting, under frame_limit 30 gets about 30 presented flips per second; a neighbour without
// a limit that waits for each flip keeps the frame clock's 60; the limit changes while the
// vGPU runs; a type's limit is its instances' default; values out of range are refused by
// name and change nothing.
//
// Rates are counts of presented flips (the status page's DISPLAY_FLIPS, as the guest sees
// them) over a window of wall time: a behaviour check with generous bounds, not a benchmark.
// The machine is shared (2 cores, other sessions), so a late frame clock gives fewer frames;
// the limiter must never give more (it counts frame boundaries, and the clock's timer never
// catches up with a burst), so the upper bounds are the tight ones.
#include <doctest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "guest/display.h"
#include "guest/guest.h"
#include "tests/e2e/guest_checks.h"
#include "tests/e2e/control.h"
#include "tests/e2e/harness.h"

using namespace vg;
using namespace vg::e2e;
using namespace vg::guest;
namespace disp = vg::abi::display;
using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr const char* kA = "f1a90000-0000-4000-8000-00000000000a";
constexpr const char* kB = "f1a90000-0000-4000-8000-00000000000b";
constexpr const char* kC = "f1a90000-0000-4000-8000-00000000000c";

struct Host : ControlHost {
  using ControlHost::ControlHost;
  Json ModifyLive(const std::string& uuid, const std::string& value) {
    return Control(control, Json{{"op", "modify"},
                                 {"uuid", uuid},
                                 {"live", true},
                                 {"addattrs", Json::array({Json{{"frame_limit", value}}})}});
  }
};

// A plane on and its first commit taken.
void PlaneOn(Device& d) {
  Display disp(d);
  REQUIRE(disp.Configure(PlaneConfig{0, 1024, disp::kFormatXrgb8888, 256, 64}).ok());
  REQUIRE(disp.WaitFlip(1, 2000).ok());
}

// The hostile desktop: commits a new base as fast as the register path takes them and never
// waits for one to take effect (two BAR0 writes a flip, each a vfio-user round trip).
class Spinner {
 public:
  explicit Spinner(Device& d) : d_(d), t_([this] { Run(); }) {}
  ~Spinner() { Stop(); }
  void Stop() {
    stop_ = true;
    if (t_.joinable()) t_.join();
  }
  uint64_t requested() const { return requested_; }
  bool failed() const { return failed_; }

 private:
  void Run() {
    for (uint32_t i = 0; !stop_; ++i) {
      if (!d_.Write32(abi::priv::kDisplayBase, (i % 2) * 65536).ok() ||
          !d_.Write32(abi::priv::kDisplayFlip, disp::kFlipMagic).ok()) {
        failed_ = true;
        return;
      }
      ++requested_;
    }
  }
  Device& d_;
  std::atomic<bool> stop_{false}, failed_{false};
  std::atomic<uint64_t> requested_{0};
  std::thread t_;
};

// The honest desktop: flips, then waits for the flip-done interrupt, as a compositor does.
class Waiter {
 public:
  explicit Waiter(Device& d) : d_(d), t_([this] { Run(); }) {}
  ~Waiter() { Stop(); }
  void Stop() {
    stop_ = true;
    if (t_.joinable()) t_.join();
  }
  bool failed() const { return failed_; }

 private:
  void Run() {
    Display disp(d_);
    for (uint32_t i = 0; !stop_; ++i) {
      auto target = disp.Flip((i % 2) * 65536);
      if (!target.ok() || !disp.WaitFlip(*target, 2000).ok()) {
        failed_ = true;
        return;
      }
    }
  }
  Device& d_;
  std::atomic<bool> stop_{false}, failed_{false};
  std::thread t_;
};

// Presented flips per second on `d` over `secs` (the status page, read without a trap, so
// it does not race the thread driving the device's registers).
double Fps(Device& d, double secs) {
  const uint32_t f0 = d.Status32(abi::status::kDisplayFlips);
  const auto t0 = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(secs));
  const uint32_t f1 = d.Status32(abi::status::kDisplayFlips);
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
  return static_cast<double>(f1 - f0) / wall;
}

}  // namespace

TEST_CASE("pacing: a spinning flipper under frame_limit 30 gets 30 fps, a neighbour keeps 60, the limit changes live") {
  Host h;
  const double w = 2.0 * SlowFactor();
  auto a = OpenGuest(h.Start(kA, Json::array({Json{{"frame_limit", "30"}}})));
  auto b = OpenGuest(h.Start(kB, Json::array()));
  {
    Json s = h.Show(kA);
    CHECK(s["frame_limit"] == 30);
    CHECK(s["scheduler"]["frame_limit"] == 30);
    CHECK(h.Show(kB)["frame_limit"] == 0);
  }
  PlaneOn(*a);
  PlaneOn(*b);
  Spinner spin(*a);
  Waiter victim(*b);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // both going

  // Measured on the shared 2-core machine: A 29.9-30.0, B 59-60 (see the report; the bounds
  // are generous below, where a loaded machine's late timer costs frames, and tight above).
  const double fa = Fps(*a, w);
  const double fb = Fps(*b, w);
  MESSAGE("limit 30: spinner ", fa, " fps (", spin.requested(), " flips requested so far); unlimited neighbour ", fb,
          " fps");
  CHECK(fa <= 30 * 1.05 + 2 / w);
  CHECK(fa >= 30 * 0.6);
  CHECK(fb >= 60 * 0.6);
  CHECK(fb <= 60 * 1.05 + 2 / w);
  // What the host sees: the spinner's commits replaced each other, the limit held them, and
  // the last whole second presented about the limit.
  {
    Json c = h.Show(kA)["counters"];
    MESSAGE("counters of A: ", c.dump());
    CHECK(c["flips_requested"].get<uint64_t>() > c["flips_presented"].get<uint64_t>());
    CHECK(c["flips_replaced"].get<uint64_t>() > 0);
    CHECK(c["flips_deferred"].get<uint64_t>() > 0);
    CHECK(c["display_fps"].get<uint64_t>() <= 32);
    CHECK(c["display_fps"].get<uint64_t>() >= 18);
    Json cb = h.Show(kB)["counters"];
    CHECK(cb["flips_deferred"] == 0);
    CHECK(cb["display_fps"].get<uint64_t>() >= 36);
  }

  // Live: 10, then off (the frame clock's 60 only).
  Json r = h.ModifyLive(kA, "10");
  REQUIRE_MESSAGE(r.value("ok", false), r.dump());
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const double f10 = Fps(*a, w);
  MESSAGE("limit 10 (live): ", f10, " fps");
  CHECK(f10 <= 10 * 1.05 + 2 / w);
  CHECK(f10 >= 10 * 0.6);
  r = h.ModifyLive(kA, "0");
  REQUIRE_MESSAGE(r.value("ok", false), r.dump());
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const double f0 = Fps(*a, w);
  MESSAGE("limit 0 (live): ", f0, " fps");
  CHECK(f0 >= 60 * 0.6);
  CHECK(f0 <= 60 * 1.05 + 2 / w);
  CHECK(h.Show(kA)["frame_limit"] == 0);

  spin.Stop();
  victim.Stop();
  CHECK_FALSE(spin.failed());
  CHECK_FALSE(victim.failed());
  CHECK(h.daemon.Alive());
}

TEST_CASE("pacing: a type's frame_limit is the default an attribute overrides; bad values are refused by name") {
  const auto types = std::filesystem::temp_directory_path() / ("vgpud-pacing-types-" + std::to_string(::getpid()));
  std::ofstream(types) << R"({"types": [
    {"name": "paced", "aperture_mib": 64, "gtt_entries": 16384, "sched_weight": 100, "max_instances": 4, "frame_limit": 20},
    {"name": "small", "aperture_mib": 64, "gtt_entries": 16384, "sched_weight": 100, "max_instances": 4}]})";
  Host h({"--types", types.string()});
  std::filesystem::remove(types);
  auto a = OpenGuest(h.Start(kA, Json::array(), "paced"));
  auto b = OpenGuest(h.Start(kB, Json::array({Json{{"frame_limit", "5"}}}), "paced"));
  CHECK(h.Show(kA)["frame_limit"] == 20);
  CHECK(h.Show(kB)["frame_limit"] == 5);

  // The type's limit reaches the worker: a spinner on A presents about 20 a second.
  PlaneOn(*a);
  {
    Spinner spin(*a);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    const double w = 1.5 * SlowFactor();
    const double fa = Fps(*a, w);
    MESSAGE("type limit 20: spinner ", fa, " fps");
    CHECK(fa <= 20 * 1.05 + 2 / w);
    CHECK(fa >= 20 * 0.6);
    spin.Stop();
    CHECK_FALSE(spin.failed());
  }
  // The attribute overrides the type, and a guest that waits for flip-done is paced by it
  // with nothing lost: every commit it makes is presented, none replaced.
  PlaneOn(*b);
  {
    Waiter paced(*b);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    const double w = 2.0 * SlowFactor();
    const double fb = Fps(*b, w);
    MESSAGE("attribute limit 5, a guest that waits for each flip: ", fb, " fps");
    CHECK(fb <= 5 * 1.05 + 2 / w);
    CHECK(fb >= 5 * 0.6);
    paced.Stop();
    CHECK_FALSE(paced.failed());  // no flip-done wait timed out
    Json c = h.Show(kB)["counters"];
    CHECK(c["flips_replaced"] == 0);
    CHECK(c["flips_deferred"].get<uint64_t>() > 0);
  }

  // Out of range or not a number: refused with a named error at start and at a live modify,
  // and nothing changes.
  const std::string invalid(ErrcName(Errc::kInvalidArgument));
  for (const std::string bad : {"61", "240", "-1", "30fps", ""}) {
    CAPTURE(bad);
    Json r = h.TryStart(kC, "small", Json::array({Json{{"frame_limit", bad}}}));
    CHECK_FALSE(r.value("ok", true));
    CHECK(r.value("error", "") == invalid);
    CHECK(r.value("message", "").find("frame_limit") != std::string::npos);
    r = h.ModifyLive(kA, bad);
    CHECK_FALSE(r.value("ok", true));
    CHECK(r.value("error", "") == invalid);
  }
  CHECK(h.Show(kA)["frame_limit"] == 20);
  CHECK(h.Show(kA)["scheduler"]["frame_limit"] == 20);
  CHECK(Control(h.control, Json{{"op", "show"}, {"uuid", kC}}).value("ok", true) == false);  // never started
  CHECK(h.daemon.Alive());
}
