#include <cstring>

#include "guest/remoting_client.h"
#include "tools/vgpu-bench/paths.h"

namespace vg::bench {
namespace {

using namespace vg::guest;

// A guest making serialized API calls: objects by client-chosen id, commands batched in a
// shared ring, the daemon woken only when idle, replies only for Read and Wait.
class RemotingPath final : public Path {
 public:
  RemotingPath(std::unique_ptr<RemotingClient> c, pid_t daemon, std::string name)
      : c_(std::move(c)), daemon_(daemon), name_(std::move(name)) {}
  std::string name() const override { return name_; }
  pid_t host_pid() const override { return daemon_; }

  Result<> Prepare(const Workload& w) override {
    Release();
    w_ = &w;
    if (w.kind == Kind::kKernel) {
      for (const auto& b : w.sample.bindings) {
        VG_TRY_ASSIGN(RemoteBuffer rb, c_->CreateBuffer(b.size()));
        VG_TRY(c_->Write(rb, 0, b));
        bufs_.push_back(rb);
      }
    } else if (w.kind == Kind::kFills) {
      VG_TRY_ASSIGN(RemoteBuffer rb, c_->CreateBuffer(uint64_t{w.commands} * 64));
      bufs_.push_back(rb);
    } else if (w.kind == Kind::kCopyCmd) {
      for (int i = 0; i < 2; ++i) {
        VG_TRY_ASSIGN(RemoteBuffer rb, c_->CreateBuffer(w.copy_bytes));
        bufs_.push_back(rb);
      }
    }
    // The uploads above are part of the set-up, not of the timed submissions.
    VG_TRY_ASSIGN(uint64_t seq, c_->Submit());
    return c_->Wait(seq);
  }

  Result<> Record() {
    switch (w_->kind) {
      case Kind::kEmpty:
        return Ok();
      case Kind::kKernel: {
        std::vector<RemoteBinding> binds;
        for (auto& b : bufs_) binds.push_back(Bind(b));
        return c_->Dispatch(w_->sample.kernel, w_->sample.groups, binds, w_->sample.push);
      }
      case Kind::kFills:
        for (uint32_t i = 0; i < w_->commands; ++i) VG_TRY(c_->Fill(bufs_[0], uint64_t{i} * 64, 64, i));
        return Ok();
      case Kind::kCopyCmd:
        return c_->Copy(bufs_[0], 0, bufs_[1], 0, w_->copy_bytes);
      case Kind::kChurn: {
        VG_TRY_ASSIGN(RemoteBuffer b, c_->CreateBuffer(w_->churn_bytes));
        VG_TRY(c_->Fill(b, 0, w_->churn_bytes, 1));
        return c_->DestroyBuffer(b);
      }
    }
    return Ok();
  }

  Result<> RunOnce() override {
    VG_TRY(Record());
    VG_TRY_ASSIGN(uint64_t seq, c_->Submit());
    return c_->Wait(seq);
  }
  Result<> RunStream(uint32_t n) override {
    uint64_t seq = 0;
    for (uint32_t i = 0; i < n; ++i) {
      VG_TRY(Record());
      VG_TRY_ASSIGN(seq, c_->Submit());
    }
    return c_->Wait(seq);
  }

  Result<std::vector<std::vector<std::byte>>> ReadBack() override {
    std::vector<std::vector<std::byte>> out;
    for (auto& b : bufs_) {
      std::vector<std::byte> data(b.size);
      VG_TRY(c_->Read(b, 0, data));
      out.push_back(std::move(data));
    }
    return out;
  }
  void Release() override {
    for (auto& b : bufs_) (void)c_->DestroyBuffer(b);
    bufs_.clear();
  }
  Crossings crossings() const override {
    const RemotingCounters& k = c_->counters();
    return {0, k.wakes_sent, 0, k.replies_waited, k.ring_bytes + k.heap_bytes_in + k.heap_bytes_out};
  }

 private:
  std::unique_ptr<RemotingClient> c_;
  pid_t daemon_;
  std::string name_;
  const Workload* w_ = nullptr;
  std::vector<RemoteBuffer> bufs_;
};

}  // namespace

Result<std::unique_ptr<Path>> MakeRemotingPath(const PathConfig& c) { return MakeRemotingVariantPath(c, "remoting"); }

Result<std::unique_ptr<Path>> MakeRemotingVariantPath(const PathConfig& c, const std::string& name) {
  RemotingOptions o;
  o.batch = c.remoting_batch;
  o.idle_notify = c.remoting_idle_notify;
  o.socket = c.remote_socket;
  o.ring_size = 1u << 20;
  // Writes and reads of the largest buffers travel through the heap.
  o.heap_size = std::max<uint64_t>(64ull << 20, c.guest_ram / 2) & ~uint64_t{4095};
  VG_TRY_ASSIGN(auto client, RemotingClient::Connect(o));
  return std::unique_ptr<Path>(new RemotingPath(std::move(client), c.daemon, name));
}

}  // namespace vg::bench
