#include "tools/vgpu-bench/desktop.h"

#include <chrono>
#include <cstring>
#include <optional>
#include <random>

#include "guest/display.h"
#include "guest/draw2d.h"
#include "guest/guest.h"
#include "shaders/reference.h"

namespace vg::bench {
namespace {

using namespace vg::guest;
using Clock = std::chrono::steady_clock;

constexpr uint64_t Up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }
uint32_t Up32(uint32_t v, uint32_t a) { return static_cast<uint32_t>(Up(v, a)); }

double Us(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

// Surface 0 is the framebuffer; the rest are window contents and the overlay.
struct Scene {
  std::vector<Surface> surf;
  std::vector<std::vector<std::byte>> init;  // per surface ({} for the framebuffer)
  std::vector<Op2D> ops;
};

std::vector<std::byte> Pixels(uint64_t bytes, uint32_t seed, bool premultiplied) {
  std::mt19937 rng(seed);
  std::vector<uint32_t> v((bytes + 3) / 4);
  for (auto& x : v) {
    x = rng();
    if (premultiplied) {
      const uint32_t a = (x >> 24) | 0x40;
      uint32_t p = a << 24;
      for (uint32_t sh = 0; sh < 24; sh += 8) p |= (((x >> sh) & 255u) * a / 255u) << sh;
      x = p;
    }
  }
  std::vector<std::byte> out(bytes);
  std::memcpy(out.data(), v.data(), bytes);
  return out;
}

// Every rectangle starts at a column that is a multiple of 4 and every stride is a multiple
// of 16 pixels, so each binding sits on a 16-byte boundary: the engine binds it in place on
// every path (the mediated executor would gather a misaligned aperture range instead).
Result<Scene> MakeScene(uint32_t w, uint32_t h, uint32_t windows) {
  VG_INVALID_IF(w < 64 || h < 48 || windows == 0 || windows > 16, "desktop {}x{} with {} windows", w, h, windows);
  Scene s;
  const uint32_t stride = Up32(w, 16u);
  s.surf.push_back({uint64_t{stride} * h * 4, stride, w, h, 4});
  s.init.emplace_back();
  auto ok = [&](Result<Op2D> op) -> Result<> {
    VG_TRY(op);
    s.ops.push_back(*op);
    return Ok();
  };
  VG_TRY(ok(FillRect(0, s.surf[0], {0, 0, w, h}, 0xFF204060u)));
  const uint32_t ww = (w * 3 / 8) & ~3u, wh = h * 3 / 8, step_x = (w / 8) & ~3u, step_y = h / 12;
  constexpr uint32_t kTitle = 8;
  for (uint32_t i = 0; i < windows; ++i) {
    const uint32_t id = static_cast<uint32_t>(s.surf.size());
    const uint32_t x = (i % 6) * step_x, y = (i % 6) * step_y + (i / 6) * 4;
    const bool rgb565 = i == 2;
    const uint32_t cs = Up32(ww, 16u);
    s.surf.push_back({uint64_t{cs} * wh * (rgb565 ? 2 : 4), cs, ww, wh, rgb565 ? 2u : 4u});
    s.init.push_back(Pixels(s.surf.back().size, 100 + i, false));
    VG_TRY(ok(FillRect(0, s.surf[0], {x, y, ww, kTitle}, 0xFFC0C0C0u ^ (i * 0x00102030u))));
    const Rect content{x, y + kTitle, ww, wh - kTitle};
    if (rgb565) {
      VG_TRY(ok(Convert565(id, s.surf[id], 0, 0, 0, s.surf[0], content)));
    } else {
      VG_TRY_ASSIGN(auto ops, Blit(id, s.surf[id], 0, 0, 0, s.surf[0], content));
      s.ops.insert(s.ops.end(), ops.begin(), ops.end());
    }
  }
  // A translucent panel over everything (premultiplied ARGB).
  const uint32_t id = static_cast<uint32_t>(s.surf.size());
  const uint32_t pw = (w / 2) & ~3u, ph = h / 4, ps = Up32(pw, 16u);
  s.surf.push_back({uint64_t{ps} * ph * 4, ps, pw, ph, 4});
  s.init.push_back(Pixels(s.surf.back().size, 7, true));
  VG_TRY(ok(Blend(id, s.surf[id], 0, 0, 0, s.surf[0], {(w / 4) & ~3u, h / 2, pw, ph})));
  return s;
}

// The frame the ops draw, on the CPU references: rows of `w` pixels, stride dropped.
Result<std::vector<uint32_t>> Reference(const Scene& s) {
  std::vector<std::vector<std::byte>> mem(s.surf.size());
  for (size_t i = 0; i < mem.size(); ++i) mem[i] = i ? s.init[i] : std::vector<std::byte>(s.surf[0].size);
  for (const Op2D& op : s.ops) {
    std::vector<std::span<std::byte>> b;
    for (const Binding2D& x : op.bindings()) b.push_back(std::span(mem[x.surface]).subspan(x.offset, x.size));
    VG_TRY(shaders::RunReference(op.kernel, op.push_bytes().first(shaders::FindKernel(op.kernel)->push_size), b,
                                 op.groups));
  }
  const Surface& fb = s.surf[0];
  std::vector<uint32_t> out(uint64_t{fb.width} * fb.height);
  for (uint32_t y = 0; y < fb.height; ++y)
    std::memcpy(&out[uint64_t{y} * fb.width], &mem[0][uint64_t{y} * fb.stride * 4], fb.width * 4ull);
  return out;
}

Result<> Compare(const Scene& s, std::span<const std::byte> fb, const std::vector<uint32_t>& want) {
  const Surface& f = s.surf[0];
  VG_ERROR_IF(fb.size() < f.size, Errc::kInternal, "framebuffer of {} bytes read back", fb.size());
  for (uint32_t y = 0; y < f.height; ++y)
    for (uint32_t x = 0; x < f.width; ++x) {
      uint32_t got;
      std::memcpy(&got, fb.data() + (uint64_t{y} * f.stride + x) * 4, 4);
      VG_ERROR_IF(got != want[uint64_t{y} * f.width + x], Errc::kInternal, "pixel ({}, {}) is {:#010x}, reference {:#010x}",
                  x, y, got, want[uint64_t{y} * f.width + x]);
    }
  return Ok();
}

// One path's frames: Draw() composes one frame and returns its submit -> fence time; Present()
// shows it (mediated: flip and wait for it); Frame() reads the last frame back.
class Desk {
 public:
  virtual ~Desk() = default;
  virtual Result<double> Draw() = 0;
  virtual Result<> Present() { return Ok(); }
  virtual Result<std::vector<std::byte>> Frame() = 0;
  virtual uint32_t flips() const { return 0; }
};

class NativeDesk final : public Desk {
 public:
  static Result<std::unique_ptr<Desk>> Make(const Scene& s, const std::string& gpu) {
    auto d = std::make_unique<NativeDesk>();
    engine::EngineOptions eo;
    eo.gpu = gpu;
    VG_TRY_ASSIGN(d->e_, engine::Engine::Create(eo));
    for (size_t i = 0; i < s.surf.size(); ++i) {
      VG_TRY_ASSIGN(engine::BufferRef b, d->e_->CreateBuffer(ByteSize{Up(s.surf[i].size, 4)}));
      auto m = b->Map();
      std::memset(m.data(), 0, m.size());
      if (i) std::memcpy(m.data(), s.init[i].data(), s.init[i].size());
      d->bufs_.push_back(b);
    }
    d->scene_ = &s;
    return std::unique_ptr<Desk>(std::move(d));
  }
  Result<double> Draw() override {
    engine::Submission sub;
    for (const Op2D& op : scene_->ops) {
      std::vector<engine::BufferRange> b;
      for (const Binding2D& x : op.bindings()) b.push_back({bufs_[x.surface], ByteSize{x.offset}, ByteSize{x.size}});
      sub.Dispatch(op.kernel, op.groups, b, op.push_bytes().first(shaders::FindKernel(op.kernel)->push_size));
    }
    const auto t0 = Clock::now();
    VG_TRY(e_->SubmitAndWait(std::move(sub)));
    return Us(Clock::now() - t0);
  }
  Result<std::vector<std::byte>> Frame() override {
    auto m = bufs_[0]->Map();
    return std::vector<std::byte>(m.begin(), m.end());
  }

 private:
  std::unique_ptr<engine::Engine> e_;
  std::vector<engine::BufferRef> bufs_;
  const Scene* scene_ = nullptr;
};

// Double-buffered in the aperture: plane b = frame % 2, flipped to once drawn.
class MediatedDesk final : public Desk {
 public:
  static Result<std::unique_ptr<Desk>> Make(const Scene& s, const PathConfig& c) {
    auto d = std::make_unique<MediatedDesk>();
    DeviceOptions o;
    o.socket = c.socket;
    o.ram_size = c.guest_ram;
    VG_TRY_ASSIGN(d->dev_, Device::Open(o));
    VG_TRY_ASSIGN(d->drv_, Driver::Create(*d->dev_));
    d->display_ = std::make_unique<Display>(*d->dev_);
    const uint64_t plane = Up(s.surf[0].size, 64 << 10);
    VG_ERROR_IF(2 * plane > d->dev_->aperture().size(), Errc::kOutOfMemory, "two {}-byte planes in a {}-byte aperture",
                plane, d->dev_->aperture().size());
    std::vector<GpuVa> va(s.surf.size());
    for (size_t i = 1; i < s.surf.size(); ++i) {
      VG_TRY_ASSIGN(GpuBuffer b, d->drv_->Alloc(Up(s.surf[i].size, kPageSize)));
      std::memcpy(b.host.data(), s.init[i].data(), s.init[i].size());
      va[i] = b.va;
    }
    for (int p = 0; p < 2; ++p) {
      d->base_[p] = static_cast<uint32_t>(p * plane);
      std::memset(d->dev_->aperture().data() + d->base_[p], 0, plane);
      VG_TRY_ASSIGN(va[0], d->drv_->MapAperture(d->base_[p], plane, true));
      for (const Op2D& op : s.ops) Emit(d->cmds_[p], op, va);
    }
    // Scan out plane 1 (blank) first: frame 0 draws into plane 0 and flips to it.
    const Surface& fb = s.surf[0];
    const uint32_t before = d->display_->flips();
    VG_TRY(d->display_->Configure({d->base_[1], fb.stride * 4, abi::display::kFormatXrgb8888, fb.width, fb.height}));
    VG_TRY(d->display_->WaitFlip(before + 1, 2000));
    d->fb_bytes_ = fb.size;
    d->flips0_ = d->display_->flips();
    return std::unique_ptr<Desk>(std::move(d));
  }
  Result<double> Draw() override {
    back_ = frame_ % 2;
    const auto t0 = Clock::now();
    VG_TRY_ASSIGN(uint64_t seq, drv_->Submit(cmds_[back_]));
    VG_TRY(drv_->Wait(seq, WaitMode::kIrq, 20000));
    return Us(Clock::now() - t0);
  }
  Result<> Present() override {
    ++frame_;
    VG_TRY_ASSIGN(uint32_t target, display_->Flip(base_[back_]));
    return display_->WaitFlip(target, 2000);
  }
  Result<std::vector<std::byte>> Frame() override {
    auto ap = dev_->aperture().subspan(base_[back_], fb_bytes_);
    return std::vector<std::byte>(ap.begin(), ap.end());
  }
  uint32_t flips() const override { return display_->flips() - flips0_; }

 private:
  std::unique_ptr<Device> dev_;
  std::unique_ptr<Driver> drv_;
  std::unique_ptr<Display> display_;
  CommandBuilder cmds_[2];
  uint32_t base_[2] = {};
  uint64_t fb_bytes_ = 0;
  uint32_t frame_ = 0, back_ = 0, flips0_ = 0;
};

class RemotingDesk final : public Desk {
 public:
  static Result<std::unique_ptr<Desk>> Make(const Scene& s, const PathConfig& c) {
    auto d = std::make_unique<RemotingDesk>();
    RemotingOptions o;
    o.socket = c.remote_socket;
    o.ring_size = 1u << 20;
    o.heap_size = 32ull << 20;
    VG_TRY_ASSIGN(d->rc_, RemotingClient::Connect(o));
    for (size_t i = 0; i < s.surf.size(); ++i) {
      VG_TRY_ASSIGN(RemoteBuffer b, d->rc_->CreateBuffer(Up(s.surf[i].size, 4)));
      if (i) VG_TRY(d->rc_->Write(b, 0, s.init[i]));
      d->bufs_.push_back(b);
      d->offsets_.push_back(0);
    }
    VG_TRY_ASSIGN(uint64_t seq, d->rc_->Submit());
    VG_TRY(d->rc_->Wait(seq));
    d->scene_ = &s;
    return std::unique_ptr<Desk>(std::move(d));
  }
  Result<double> Draw() override {
    const auto t0 = Clock::now();
    for (const Op2D& op : scene_->ops) VG_TRY(Emit(*rc_, op, bufs_, offsets_));
    VG_TRY_ASSIGN(uint64_t seq, rc_->Submit());
    VG_TRY(rc_->Wait(seq));
    return Us(Clock::now() - t0);
  }
  Result<std::vector<std::byte>> Frame() override {
    std::vector<std::byte> out(bufs_[0].size);
    VG_TRY(rc_->Read(bufs_[0], 0, out));
    return out;
  }

 private:
  std::unique_ptr<RemotingClient> rc_;
  std::vector<RemoteBuffer> bufs_;
  std::vector<uint64_t> offsets_;
  const Scene* scene_ = nullptr;
};

DesktopCell RunPath(const std::string& path, Desk& d, const Scene& s, const std::vector<uint32_t>& want,
                    const DesktopOptions& o) {
  DesktopCell c;
  c.path = path;
  auto fail = [&](const std::string& what, const Error& e) {
    c.error = what + ": " + e.ToString();
    return c;
  };
  std::vector<double> frame_us, period_us;
  Clock::time_point start{}, last{};
  const int total = o.warmup + o.frames;
  for (int i = 0; i < total; ++i) {
    const auto t = Clock::now();
    if (i == o.warmup) {
      start = t;
      c.flips = d.flips();
    }
    if (i > o.warmup) period_us.push_back(Us(t - last));
    last = t;
    auto us = d.Draw();
    if (!us.ok()) return fail(fmt::format("frame {}", i), us.error());
    if (i >= o.warmup) frame_us.push_back(*us);
    if (i == 0) {
      // The bench checks its own work: the first frame against the CPU reference.
      auto fb = d.Frame();
      if (!fb.ok()) return fail("read back", fb.error());
      if (auto r = Compare(s, *fb, want); !r.ok()) return fail("first frame", r.error());
    }
    if (auto r = d.Present(); !r.ok()) return fail(fmt::format("present {}", i), r.error());
  }
  const auto end = Clock::now();
  period_us.push_back(Us(end - last));
  c.flips = d.flips() - c.flips;
  auto fb = d.Frame();
  if (!fb.ok()) return fail("read back", fb.error());
  if (auto r = Compare(s, *fb, want); !r.ok()) return fail("last frame", r.error());
  c.correct = true;
  c.frames = o.frames;
  c.frame_us = Summarize(frame_us);
  c.period_us = Summarize(period_us);
  c.fps = o.frames / std::chrono::duration<double>(end - start).count();
  return c;
}

}  // namespace

DesktopReport MeasureDesktop(const DesktopOptions& o, const DesktopHostFactory& make_host, const std::string& gpu) {
  DesktopReport r;
  r.ran = true;
  r.width = o.width;
  r.height = o.height;
  r.windows = o.windows;
  auto scene = MakeScene(o.width, o.height, o.windows);
  auto want = scene.ok() ? Reference(*scene) : Result<std::vector<uint32_t>>(scene.error());
  if (!want.ok()) {
    r.cells.push_back({.path = "all", .error = "scene: " + want.error().ToString()});
    return r;
  }
  r.ops_per_frame = static_cast<uint32_t>(scene->ops.size());
  std::optional<Result<DesktopHost>> host;  // made for the first path that needs a daemon
  for (const std::string& p : o.paths) {
    if (o.progress)
      std::fprintf(stderr, "desktop: %s, %d frames of %ux%u, %u windows\n", p.c_str(), o.frames, o.width, o.height,
                   o.windows);
    Result<std::unique_ptr<Desk>> d = MakeError(Errc::kUnsupported, "no desktop on path {}", p);
    if (p == "native") {
      d = NativeDesk::Make(*scene, gpu);
    } else if (p == "mediated" || p == "remoting" || p == "mediated-limited") {
      if (!host) host = make_host();
      if (!host->ok())
        d = host->error();
      else if (p == "remoting")
        d = RemotingDesk::Make(*scene, (*host)->remoting);
      else
        d = MediatedDesk::Make(*scene, p == "mediated" ? (*host)->mediated : (*host)->limited);
    }
    if (!d.ok()) {
      r.cells.push_back({.path = p, .error = "setup: " + d.error().ToString()});
      continue;
    }
    r.cells.push_back(RunPath(p, **d, *scene, *want, o));
    if (p == "mediated-limited") r.cells.back().frame_limit = o.frame_limit;
  }
  return r;
}

std::string FormatDesktop(const DesktopReport& r) {
  if (!r.ran) return "";
  std::string out = fmt::format(
      "\n== desktop: {} windows composited into {}x{} each frame ({} 2-D dispatches); mediated flips once per frame "
      "and waits for it\n",
      r.windows, r.width, r.height, r.ops_per_frame);
  out += fmt::format("{:<16} {:>7} {:>12} {:>12} {:>12} {:>12} {:>9} {:>6} {:>4}\n", "path", "frames", "frame p50 us",
                     "frame p99 us", "period p50", "period p99", "fps", "flips", "ok");
  for (const DesktopCell& c : r.cells) {
    if (!c.error.empty()) {
      out += fmt::format("{:<16} FAILED: {}\n", c.path, c.error);
      continue;
    }
    out += fmt::format("{:<16} {:>7} {:>12.1f} {:>12.1f} {:>12.1f} {:>12.1f} {:>9.1f} {:>6} {:>4}\n", c.path, c.frames,
                       c.frame_us.p50, c.frame_us.p99, c.period_us.p50, c.period_us.p99, c.fps, c.flips,
                       c.correct ? "yes" : "NO");
  }
  return out;
}

nlohmann::json DesktopJson(const DesktopReport& r) {
  nlohmann::json j;
  j["width"] = r.width;
  j["height"] = r.height;
  j["windows"] = r.windows;
  j["ops_per_frame"] = r.ops_per_frame;
  j["cells"] = nlohmann::json::array();
  for (const DesktopCell& c : r.cells) {
    nlohmann::json x;
    x["path"] = c.path;
    x["frames"] = c.frames;
    x["frame_us"] = {{"p50", c.frame_us.p50}, {"p99", c.frame_us.p99}, {"mean", c.frame_us.mean}};
    x["period_us"] = {{"p50", c.period_us.p50}, {"p99", c.period_us.p99}};
    x["fps"] = c.fps;
    if (c.frame_limit) x["frame_limit"] = c.frame_limit;
    x["flips"] = c.flips;
    x["correct"] = c.correct;
    if (!c.error.empty()) x["error"] = c.error;
    j["cells"].push_back(x);
  }
  return j;
}

}  // namespace vg::bench
