#include <cstring>

#include "engine/engine.h"
#include "tools/vgpu-bench/paths.h"

namespace vg::bench {
namespace {

using namespace vg::engine;

// The baseline: the workload calls the engine in this process.
class NativePath final : public Path {
 public:
  explicit NativePath(std::shared_ptr<Engine> e) : engine_(std::move(e)) {}
  std::string name() const override { return "native"; }

  Result<> Prepare(const Workload& w) override {
    w_ = &w;
    bufs_.clear();
    if (w.kind == Kind::kKernel) {
      for (const auto& b : w.sample.bindings) {
        VG_TRY_ASSIGN(BufferRef buf, engine_->CreateBuffer(ByteSize{b.size()}));
        std::memcpy(buf->Map().data(), b.data(), b.size());
        bufs_.push_back(std::move(buf));
      }
    } else if (w.kind == Kind::kCopyCmd) {
      for (int i = 0; i < 2; ++i) {
        VG_TRY_ASSIGN(BufferRef buf, engine_->CreateBuffer(ByteSize{w.copy_bytes}));
        bufs_.push_back(std::move(buf));
      }
    } else if (w.kind == Kind::kFills) {
      VG_TRY_ASSIGN(BufferRef buf, engine_->CreateBuffer(ByteSize{uint64_t{w.commands} * 64}));
      bufs_.push_back(std::move(buf));
    }
    return Ok();
  }

  Result<> Submit(bool wait) {
    switch (w_->kind) {
      case Kind::kEmpty:
        return Go(Submission{}, wait);
      case Kind::kKernel: {
        std::vector<BufferRange> bindings;
        for (auto& b : bufs_) bindings.push_back(Whole(b));
        Submission s;
        s.Dispatch(w_->sample.kernel, w_->sample.groups, std::move(bindings), w_->sample.push);
        return Go(std::move(s), wait);
      }
      case Kind::kFills: {
        // The engine takes at most kMaxOpsPerSubmission ops; more commands are more
        // submissions, the last one waited: the same work the other paths do in one.
        Submission s;
        for (uint32_t i = 0; i < w_->commands; ++i) {
          s.Fill(bufs_[0], ByteSize{uint64_t{i} * 64}, ByteSize{64}, i);
          if (s.ops.size() == kMaxOpsPerSubmission && i + 1 < w_->commands) {
            VG_TRY(Go(std::move(s), false));
            s = Submission{};
          }
        }
        return Go(std::move(s), wait);
      }
      case Kind::kCopyCmd: {
        Submission s;
        s.Copy(bufs_[0], ByteSize{0}, bufs_[1], ByteSize{0}, ByteSize{w_->copy_bytes});
        return Go(std::move(s), wait);
      }
      case Kind::kChurn: {
        VG_TRY_ASSIGN(BufferRef b, engine_->CreateBuffer(ByteSize{w_->churn_bytes}));
        Submission s;
        s.Fill(b, ByteSize{0}, ByteSize{w_->churn_bytes}, 1);
        return Go(std::move(s), wait);
      }
    }
    return Ok();
  }

  Result<> RunOnce() override { return Submit(true); }
  Result<> RunStream(uint32_t n) override {
    for (uint32_t i = 0; i + 1 < n; ++i) VG_TRY(Submit(false));
    return Submit(true);
  }

  Result<std::vector<std::vector<std::byte>>> ReadBack() override {
    std::vector<std::vector<std::byte>> out;
    for (auto& b : bufs_) {
      auto m = b->Map();
      out.emplace_back(m.begin(), m.end());
    }
    return out;
  }
  void Release() override { bufs_.clear(); }
  Crossings crossings() const override { return {}; }

 private:
  Result<> Go(Submission s, bool wait) {
    if (wait) {
      VG_TRY(engine_->SubmitAndWait(std::move(s)));
      return Ok();
    }
    VG_TRY_ASSIGN(auto token, engine_->Submit(std::move(s)));
    (void)token;
    return Ok();
  }

  std::shared_ptr<Engine> engine_;
  const Workload* w_ = nullptr;
  std::vector<BufferRef> bufs_;
};

}  // namespace

Result<std::unique_ptr<Path>> MakeNativePath(const PathConfig& c) {
  EngineOptions o;
  o.gpu = c.gpu;
  VG_TRY_ASSIGN(auto e, Engine::Create(o));
  return std::unique_ptr<Path>(new NativePath(std::shared_ptr<Engine>(std::move(e))));
}

std::unique_ptr<Path> MakeNativePathOn(std::shared_ptr<Engine> engine) {
  return std::unique_ptr<Path>(new NativePath(std::move(engine)));
}

}  // namespace vg::bench
