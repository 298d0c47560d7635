#pragma once
// vgpud's GPU engine: Vulkan compute on the host device (lavapipe by default), running
// the catalogue kernels (shaders/catalogue.h) for the native, mediated and remoting
// paths alike. Validation is apart from execution (Validate() is const and has no side
// effects; Submit() runs it first), errors are values, nothing throws across this API.

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "base/fd.h"
#include "base/result.h"
#include "base/types.h"

namespace vg::engine {

class EngineImpl;

struct EngineOptions {
  // Device override: a case-insensitive substring of the device name, or its index in
  // Engine::ListDevices(). Empty: $VGPUD_GPU, then the policy (discrete > integrated >
  // virtual > cpu). An override that matches nothing is kNotFound, not a silent fallback.
  std::string gpu;
  bool use_env = true;          // read $VGPUD_GPU when `gpu` is empty
  bool allow_zero_copy = true;  // false: WrapHostMemory always stages (A/B measurements)
};

enum class DeviceKind : uint8_t { kOther, kIntegrated, kDiscrete, kVirtual, kCpu };
std::string_view DeviceKindName(DeviceKind k);

struct DeviceInfo {
  uint32_t index = 0;  // in ListDevices() order
  std::string name;
  std::string driver_name;
  std::string driver_info;
  std::string api_version;  // "1.3.230"
  DeviceKind kind = DeviceKind::kOther;
  uint32_t vendor_id = 0;
  uint32_t device_id = 0;
  uint32_t queue_family = 0;
  // Limits the engine validates against.
  uint64_t max_storage_buffer_range = 0;
  uint64_t max_allocation_size = 0;
  uint64_t min_storage_offset_alignment = 0;
  std::array<uint32_t, 3> max_group_count{};
  std::array<uint32_t, 3> max_workgroup_size{};
  uint32_t max_workgroup_invocations = 0;
  uint32_t max_push_constants = 0;
  uint32_t max_shared_memory = 0;
  // Workgroups the device runs at once, where known: a CPU device's (lavapipe's) worker
  // threads (LP_NUM_THREADS, else the CPUs, at most 16); 1 where not known. The scheduler
  // sizes its pieces of work by it (mediator::SubmissionBudget): a piece of fewer groups
  // than this leaves lanes idle while it runs alone.
  uint32_t parallel_groups = 1;
  // Memory import features.
  bool external_memory_host = false;  // VK_EXT_external_memory_host
  uint64_t host_import_alignment = 0; // minImportedHostPointerAlignment
  bool external_memory_fd = false;    // VK_KHR_external_memory_fd
  bool timeline_semaphore = false;

  std::string ToString() const;  // multi-line, for logs and `vgpuctl info`
};

// How a buffer's bytes reach the device.
enum class MemoryPath : uint8_t {
  kDevice,    // engine-allocated (host-visible device memory)
  kZeroCopy,  // caller's host memory imported with VK_EXT_external_memory_host
  kStaged,    // caller's host memory, copied in before / out after each submission using it
};
std::string_view MemoryPathName(MemoryPath p);

// Engine buffers are reference counted: a submission holds its buffers until it completes.
class Buffer {
 public:
  virtual ~Buffer() = default;
  virtual ByteSize size() const = 0;
  virtual MemoryPath path() const = 0;
  // Host view of the bytes: device memory for kDevice, the caller's memory for wraps.
  // Reading or writing it while a submission using the buffer is pending is a race.
  virtual std::span<std::byte> Map() const = 0;
};
using BufferRef = std::shared_ptr<Buffer>;

struct BufferRange {
  BufferRef buffer;
  ByteSize offset{0};
  ByteSize size{0};
};
inline BufferRange Whole(const BufferRef& b) { return {b, ByteSize{0}, b ? b->size() : ByteSize{0}}; }

struct DispatchOp {
  uint32_t kernel = 0;  // shaders::KernelId
  std::array<uint32_t, 3> groups{1, 1, 1};
  std::vector<BufferRange> bindings;
  std::vector<std::byte> push;
  // First group of this dispatch (vkCmdDispatchBase): a caller cuts one large dispatch into
  // group ranges so that no single submission runs unbounded (docs/device-spec.md, bounds).
  // base + groups must stay within the kernel's and the device's group limits.
  std::array<uint32_t, 3> base{0, 0, 0};
};
struct CopyOp {
  BufferRef src;
  ByteSize src_offset{0};
  BufferRef dst;
  ByteSize dst_offset{0};
  ByteSize size{0};
};
struct FillOp {  // offset and size multiples of 4
  BufferRef dst;
  ByteSize offset{0};
  ByteSize size{0};
  uint32_t value = 0;
};
using Op = std::variant<DispatchOp, CopyOp, FillOp>;

// Ops run in order: the engine puts a full memory barrier between consecutive ops.
struct Submission {
  std::vector<Op> ops;
  // How many guest submissions this one carries (a rate limit counts them; 0: none, the
  // engine's own work). Not validated: the SubmitGate reads it.
  uint32_t guest_submissions = 0;
  // The submitter's estimate of the work (the mediator's cost units; 0: none). Not
  // validated: the SubmitGate bounds what is on the device by it.
  uint64_t cost = 0;

  Submission& Dispatch(uint32_t kernel, std::array<uint32_t, 3> groups, std::vector<BufferRange> bindings,
                       std::span<const std::byte> push, std::array<uint32_t, 3> base = {0, 0, 0});
  Submission& Copy(BufferRef src, ByteSize src_offset, BufferRef dst, ByteSize dst_offset, ByteSize size);
  Submission& Fill(BufferRef dst, ByteSize offset, ByteSize size, uint32_t value);
};

inline constexpr size_t kMaxOpsPerSubmission = 256;
inline constexpr size_t kMaxInFlight = 1024;

// Completion state of one submission (one fence). Shared by the engine and the submitter.
class SubmitToken {
 public:
  uint64_t serial() const { return serial_; }
  bool Done() const;
  // kBusy while pending; then ok, or the error the submission ended with (kDeviceLost…).
  Result<> Status() const;
  // Blocks until done or the timeout passes (kTimeout).
  Result<> Wait(std::chrono::milliseconds timeout = std::chrono::milliseconds(-1)) const;
  // When the engine saw it complete (steady_clock, i.e. CLOCK_MONOTONIC); nullopt while
  // pending. What the host coarsens a guest-visible completion from (docs/device-spec.md,
  // "Time a guest can read"): a waiter that comes late still knows when it really ended.
  std::optional<std::chrono::steady_clock::time_point> DoneAt() const;

  explicit SubmitToken(uint64_t serial) : serial_(serial) {}

 private:
  friend class EngineImpl;
  void Complete(Result<> r);

  uint64_t serial_;
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  bool done_ = false;
  std::chrono::steady_clock::time_point done_at_{};
  Result<> result_;
};
using TokenRef = std::shared_ptr<SubmitToken>;

// How the submitter hears about completion: either, both or neither (then poll the token).
struct Completion {
  // Runs on the engine's completion thread. It may Submit() but must not wait on
  // another submission (the thread that would complete it is the one running this).
  std::function<void(const Result<>&)> callback;
  // Signalled (+1) after the token completes; a libevent loop can wait on it. Not owned:
  // it must outlive the submission.
  const EventFd* eventfd = nullptr;
};

struct EngineCounters {
  uint64_t bytes_zero_copy = 0;    // bytes of host memory imported without a copy
  uint64_t bytes_staged_in = 0;    // bytes copied host -> staging before submissions
  uint64_t bytes_staged_out = 0;   // bytes copied staging -> host after submissions
  uint64_t submissions = 0;
  uint64_t ops = 0;
  uint64_t pipelines_built = 0;
  uint64_t device_lost_reports = 0;  // pending submissions completed with kDeviceLost
};

// An arbiter of the device outside this engine: a worker's share of the host's GPU time
// (the supervisor's scheduler) and its rate limits (docs/management.md, F7). Queued work
// reaches the device only while the gate admits it; held work keeps its place (FIFO) and
// nobody who submits it waits: Engine::Pump() retries once the gate may have opened.
class SubmitGate {
 public:
  virtual ~SubmitGate() = default;
  // May `s` go to the device now? False holds it and everything queued behind it. Called
  // with the engine's queue lock held: must not block nor call the engine.
  virtual bool Admit(const Submission& s) = 0;
  // A submission the gate admitted has completed on the device. `busy_ns` is the device
  // time it is charged: from when it reached the device, or from when the previous one
  // completed if that was later (the device was busy with earlier work), to its
  // completion. `device_idle`: no admitted work is left on the device. `cost`: the
  // submission's Submission::cost. Called on the completion thread without engine locks;
  // may not wait on the engine.
  virtual void Ran(uint64_t busy_ns, bool device_idle, uint64_t cost) = 0;
  // Whether a submitter should keep its submissions small now rather than pack more work
  // into one (another party waits for the device: one submission is its wait). Lock-free,
  // any thread.
  virtual bool PrefersSmallSubmissions() const { return false; }
};

class Engine {
 public:
  static Result<std::unique_ptr<Engine>> Create(const EngineOptions& options = {});
  // Every Vulkan device with a compute queue, in index order (for --gpu and tools).
  static Result<std::vector<DeviceInfo>> ListDevices();
  ~Engine();  // waits for pending submissions
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const DeviceInfo& Info() const;
  EngineCounters Counters() const;

  // Zeroed device memory (host-visible), 0 < size <= max_allocation_size.
  Result<BufferRef> CreateBuffer(ByteSize size);
  // Wraps memory the caller owns and keeps mapped for the buffer's whole life (a guest DMA
  // region, an aperture memfd mapping). Zero-copy when the device offers
  // VK_EXT_external_memory_host, its import alignment is at most a page (the span is
  // rounded out to it internally: mappings are page-granular, so the rounded range is
  // still mapped) and the start is aligned to minStorageBufferOffsetAlignment; otherwise
  // a staging buffer. Buffer::path() and Counters() tell which.
  Result<BufferRef> WrapHostMemory(std::span<std::byte> host);

  // No side effects. kBadKernel (unknown kernel, binding count, push size),
  // kInvalidArgument (null/foreign buffer, zero size or groups), kOutOfBounds (range past
  // a buffer, binding smaller than the kernel needs), kMisaligned (binding offset, fill
  // offset/size), kLimitExceeded (groups over device or kernel limits, binding over
  // maxStorageBufferRange, too many ops, a push word over its limit), kOverlap (copy
  // within one buffer with overlapping ranges).
  Result<> Validate(const Submission& s) const;
  // Validate, then record and queue. Thread-safe: submitters share no state but the queue
  // lock, and never block on the GPU. Submissions run in the order they were queued. An
  // error returned here means nothing was queued (kDeviceLost once the device is lost,
  // kBusy past kMaxInFlight pending); later errors (vkQueueSubmit, device loss) reach
  // the token, the callback and the eventfd, exactly once each.
  Result<TokenRef> Submit(Submission s, Completion completion = {});
  Result<> SubmitAndWait(Submission s);
  // Waits for every submission queued so far.
  Result<> WaitIdle();
  // Puts `gate` in front of the device (before the first Submit; it must outlive the
  // engine). Null: everything goes to the device at once.
  void SetGate(SubmitGate* gate);
  // Hands held work to the device as far as the gate now admits. Any thread but one
  // holding a lock the gate takes.
  void Pump();
  // The gate's PrefersSmallSubmissions() (false without a gate). Lock-free.
  bool PrefersSmallSubmissions() const;

  // Test hook: behave as if vkWaitForFences returned VK_ERROR_DEVICE_LOST.
  void SimulateDeviceLost();

 private:
  explicit Engine(std::unique_ptr<EngineImpl> impl);
  std::unique_ptr<EngineImpl> impl_;
};

}  // namespace vg::engine
