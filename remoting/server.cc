// The daemon side of API remoting: listener, handshake, and per-client sessions that copy
// the published ring span out of shared memory, decode and validate the copy, and replay
// it on the engine. docs/remoting-protocol.md is the contract.
#include <event2/event.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "engine/engine.h"
#include "mediator/work_split.h"
#include "remoting/decoder.h"
#include "remoting/remoting.h"
#include "abi/remoting.h"

namespace vg::remoting {

namespace {

namespace w = wire;

// Work one client may do in one loop turn before it yields (re-arms itself for the next
// turn, after the loop has polled every other fd): refills of the private copy, commands
// executed, and bytes WRITE/READ copy between the heap and buffers (a 256 MiB WRITE is
// cut into turns of this many bytes). docs/remoting-protocol.md, "Bounds and blocking".
constexpr int kMaxRefillsPerTurn = 4;
constexpr int kMaxCommandsPerTurn = 256;
constexpr uint64_t kMaxCopyBytesPerTurn = 4ull << 20;

// Backpressure: a client may have this many engine submissions of at most kMaxOpsPerBatch
// ops queued; past that its ring stops draining (and the client waits for space), so one
// client cannot fill the engine's queue ahead of everyone else, nor leave minutes of
// work behind when it dies.
constexpr size_t kMaxInflightPerClient = 2;
constexpr size_t kMaxOpsPerBatch = 64;

// Coarsened time: steady_clock is CLOCK_MONOTONIC (libstdc++ on Linux), the clock a client
// times itself with.
uint64_t SteadyNs(std::chrono::steady_clock::time_point t) {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count());
}
uint64_t NowNs() { return SteadyNs(std::chrono::steady_clock::now()); }
constexpr const char* kQuarantinedWhy = "the vGPU is quarantined for its fault rate; a reset lifts it";

class ListenerImpl;

class Session {
 public:
  Session(ListenerImpl& owner, uint32_t id, UniqueFd sock);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  uint32_t id() const { return id_; }
  bool dead() const { return dead_; }
  bool pending() const { return !running_ && !dead_; }
  bool running() const { return running_ && !dead_; }
  void Refuse(Errc code, const std::string& why);

 private:
  static void OnSocket(int fd, short what, void* arg);
  static void OnWake(int fd, short what, void* arg);
  static void OnDone(int fd, short what, void* arg);
  static void OnResume(int fd, short what, void* arg);
  static void OnTick(int fd, short what, void* arg);
  static void OnHandshakeTimeout(int fd, short what, void* arg);

  Result<> Handshake();
  void SendWelcome(Errc status);
  void Process();
  // Runs one decoded command (already validated). False: a WRITE/READ used up this turn's
  // copy budget with bytes left; the cursor is not advanced and it continues next turn.
  Result<bool> Execute(const Command& c);
  Result<> ValidateOnEngine(const Command& c) const;
  Result<> Flush();
  // Retires the in-flight submissions that have completed, in order: with time coarsened,
  // only those whose tick has come (the rest wait for tick_ev_).
  void RetireDone();
  // Coarsened time: the first multiple of G at or after `ns`; and the timer that brings the
  // session back at `due` (the earliest asked for wins).
  uint64_t Tick(uint64_t ns) const;
  void ArmTick(uint64_t due);
  uint64_t granularity() const;  // G, 0: time is not coarsened
  void Reap();
  void Report(Errc code, uint32_t pos, const std::string& what);
  void Drop(Errc code, const std::string& what);
  // Ends this turn and comes back on the next one (a zero timeout: the loop polls every
  // fd first; event_active would run us again before any other fd is looked at).
  void Yield();
  // F7 pieces: the cost one engine submission may carry now (smaller while the engine is
  // shared under the scheduler), COPY/FILL chunk bytes, and whether `cost` more fits in
  // pending_ (else it is flushed; false: the client's in-flight submissions are full).
  uint64_t SubmissionBudget() const;
  uint64_t Chunk() const;
  Result<bool> Room(uint64_t cost);
  // F7, throttled: ends this turn and comes back once `wait` has passed (a timer, never a
  // sleep); the command at the cursor runs then.
  void Defer(std::chrono::nanoseconds wait);
  // A WRITE or READ, copied at most `budget` bytes per turn; false while bytes remain.
  bool CopyStep(std::span<std::byte> dst, std::span<const std::byte> src, uint64_t& budget);
  engine::BufferRef Charged(engine::BufferRef raw, uint64_t size, std::shared_ptr<Mapping> memory);
  void PublishHead() { w::StoreShared<uint32_t>(area(), w::kHeadOffset, head_); }
  void SetFlags(uint32_t f) { w::StoreShared<uint32_t>(area(), w::kStatusFlagsOffset, f, std::memory_order_seq_cst); }
  std::byte* area() const { return area_.data(); }
  std::span<std::byte> heap() const { return area_.bytes().subspan(w::HeapOffset(ring_size_), heap_size_); }
  engine::BufferRef Buffer(uint32_t id) const { return buffers_.at(id); }

  ListenerImpl& owner_;
  uint32_t id_;
  UniqueFd sock_;
  event* sock_ev_ = nullptr;
  event* wake_ev_ = nullptr;
  event* done_ev_ = nullptr;
  event* resume_ev_ = nullptr;
  event* deadline_ev_ = nullptr;
  event* tick_ev_ = nullptr;
  uint64_t tick_due_ns_ = 0;        // when tick_ev_ is armed for (while pending)
  uint64_t gpu_done_ns_ = 0;        // latest completion of a retired submission (steady ns)
  uint64_t copied_ns_ = 0;          // when the backlog was copied out of the ring
  bool running_ = false;
  bool dead_ = false;
  uint64_t turn_copy_budget_ = 0;
  uint64_t copy_done_ = 0;          // bytes of the WRITE/READ at cursor_ already copied
  // F7: the GPU command at cursor_ is cut into pieces of bounded cost (the mediated path's
  // rules, mediator/work_split.h), and may span turns when the client's in-flight
  // submissions are full: the next piece (DISPATCH) or byte (COPY, FILL), and the cut.
  uint64_t gpu_done_ = 0;
  std::optional<mediator::DispatchCut> cut_;

  Mapping area_;
  uint32_t ring_size_ = 0;
  uint64_t heap_size_ = 0;
  EventFd wake_;                    // the client's: readable when the client kicks us
  EventFd reply_;                   // ours: signalled on fences, replies, errors, drop
  std::shared_ptr<EventFd> done_;   // engine completion thread -> loop
  // Bytes of destroyed buffers whose last reference (a queued or in-flight submission) has
  // died since the loop last looked: the quota holds a destroyed buffer's bytes until then.
  std::shared_ptr<std::atomic<uint64_t>> released_ = std::make_shared<std::atomic<uint64_t>>(0);

  // Copy, then check, then use: [head_, head_ + backlog_.size()) of the ring, copied once.
  uint32_t head_ = 0;               // private; the shared head is only ever written
  std::vector<std::byte> backlog_;
  size_t cursor_ = 0;
  uint32_t backlog_pos_ = 0;

  ObjectTable objects_;
  std::map<uint32_t, engine::BufferRef> buffers_;
  engine::Submission pending_;
  uint64_t pending_cost_ = 0;       // cost units packed in pending_ (mediator/work_split.h)
  uint32_t pending_pos_ = 0;        // ring position of the last command in pending_
  std::deque<std::pair<engine::TokenRef, uint32_t>> inflight_;
  uint32_t error_count_ = 0;
};

class ListenerImpl final : public Listener {
 public:
  ListenerImpl(event_base* base, engine::Engine& engine, std::string path, Limits limits, bool owns_path = true)
      : base_(base), engine_(engine), path_(std::move(path)), limits_(limits), owns_path_(owns_path) {}
  ~ListenerImpl() override {
    sessions_.clear();
    if (accept_ev_) event_free(accept_ev_);
    if (backoff_ev_) event_free(backoff_ev_);
    if (reap_ev_) event_free(reap_ev_);
    if (!path_.empty() && owns_path_) ::unlink(path_.c_str());
  }

  // `listening`: a socket that already listens (CreateOnSocket); otherwise path_ is bound
  // here, or nothing listens (CreateUnbound).
  Result<> Init(UniqueFd listening = {}) {
    reap_ev_ = event_new(base_, -1, 0, &ListenerImpl::OnReap, this);
    VG_ERROR_IF(!reap_ev_, Errc::kInternal, "event_new failed");
    if (listening.Valid()) {
      const int fl = ::fcntl(listening.Get(), F_GETFL);
      VG_ERROR_IF(fl < 0 || ::fcntl(listening.Get(), F_SETFL, fl | O_NONBLOCK) != 0, Errc::kIo, "fcntl {}: {}",
                  path_, std::strerror(errno));
      listen_ = std::move(listening);
    } else if (path_.empty()) {
      return Ok();
    } else {
      VG_TRY_ASSIGN(listen_, ListenUnix(path_, SOCK_SEQPACKET, 16));
    }
    accept_ev_ = event_new(base_, listen_.Get(), EV_READ | EV_PERSIST, &ListenerImpl::OnAccept, this);
    backoff_ev_ = evtimer_new(base_, &ListenerImpl::OnBackoff, this);
    VG_ERROR_IF(!accept_ev_ || !backoff_ev_, Errc::kInternal, "event_new failed");
    event_add(accept_ev_, nullptr);
    return Ok();
  }

  Result<> Adopt(UniqueFd sock) override {
    int fl = ::fcntl(sock.Get(), F_GETFL);
    VG_ERROR_IF(fl < 0 || ::fcntl(sock.Get(), F_SETFL, fl | O_NONBLOCK) != 0, Errc::kIo, "fcntl: {}",
                std::strerror(errno));
    // A bounded number of handshakes wait at once: make room by refusing the oldest (a
    // real client sends its Hello as soon as it connects; an idle one only holds a slot).
    std::vector<Session*> waiting;
    for (auto& [sid, se] : sessions_)
      if (se->pending()) waiting.push_back(se.get());
    if (!waiting.empty() && waiting.size() >= limits_.max_pending_handshakes) {
      ++stats_.refused;
      waiting.front()->Refuse(Errc::kLimitExceeded, fmt::format("over {} connections waiting for their handshake",
                                                                limits_.max_pending_handshakes));
    }
    uint32_t id = next_id_++;
    sessions_.emplace(id, std::make_unique<Session>(*this, id, std::move(sock)));
    return Ok();
  }
  void SetFaultGate(FaultGate* gate) override { gate_ = gate; }
  FaultGate::Admission Admit() { return gate_ ? gate_->Admit() : FaultGate::Admission{}; }
  // Errors that are the client's doing count toward its vGPU's fault rate; the quarantine's
  // own refusals and the host's engine failing do not.
  void CountFault(Errc code) {
    if (gate_ && code != Errc::kQuarantined && code != Errc::kDeviceLost && code != Errc::kInternal)
      gate_->OnFault();
  }
  size_t clients() const override { return sessions_.size(); }
  size_t running_clients() const {
    return static_cast<size_t>(std::count_if(sessions_.begin(), sessions_.end(),
                                             [](const auto& kv) { return kv.second->running(); }));
  }
  ListenerStats stats() const override { return stats_; }
  const std::string& path() const override { return path_; }

  void ScheduleReap() { event_active(reap_ev_, EV_TIMEOUT, 0); }

  event_base* base_;
  engine::Engine& engine_;
  std::string path_;
  Limits limits_;
  bool owns_path_;
  ListenerStats stats_;
  FaultGate* gate_ = nullptr;

 private:
  static void OnAccept(int fd, short, void* arg) {
    auto* self = static_cast<ListenerImpl*>(arg);
    for (;;) {
      auto c = AcceptConnection(fd);
      if (c.ok()) {
        (void)self->Adopt(std::move(c).value());
        continue;
      }
      if (c.code() == Errc::kLimitExceeded) {
        // Out of fds: the listener stays readable, so stop watching it for a while
        // instead of spinning the loop that serves every tenant.
        ++self->stats_.refused;
        VG_LOGW("remoting {}: {}", self->path_, c.error().what);
        event_del(self->accept_ev_);
        timeval tv{0, kAcceptBackoffMs * 1000};
        evtimer_add(self->backoff_ev_, &tv);
      }
      return;
    }
  }
  static void OnBackoff(int, short, void* arg) {
    auto* self = static_cast<ListenerImpl*>(arg);
    event_add(self->accept_ev_, nullptr);
  }
  static void OnReap(int, short, void* arg) {
    auto* self = static_cast<ListenerImpl*>(arg);
    std::erase_if(self->sessions_, [](const auto& kv) { return kv.second->dead(); });
  }

  UniqueFd listen_;
  event* accept_ev_ = nullptr;
  event* backoff_ev_ = nullptr;
  event* reap_ev_ = nullptr;
  uint32_t next_id_ = 1;
  std::map<uint32_t, std::unique_ptr<Session>> sessions_;
};

// ---- Session ----------------------------------------------------------------------------

Session::Session(ListenerImpl& owner, uint32_t id, UniqueFd sock)
    : owner_(owner), id_(id), sock_(std::move(sock)), objects_(owner.limits_) {
  sock_ev_ = event_new(owner_.base_, sock_.Get(), EV_READ | EV_PERSIST, &Session::OnSocket, this);
  event_add(sock_ev_, nullptr);
  resume_ev_ = evtimer_new(owner_.base_, &Session::OnResume, this);
  deadline_ev_ = evtimer_new(owner_.base_, &Session::OnHandshakeTimeout, this);
  tick_ev_ = evtimer_new(owner_.base_, &Session::OnTick, this);
  const uint32_t ms = owner_.limits_.handshake_timeout_ms;
  timeval tv{static_cast<time_t>(ms / 1000), static_cast<suseconds_t>((ms % 1000) * 1000)};
  if (deadline_ev_) evtimer_add(deadline_ev_, &tv);
}

void Session::Refuse(Errc code, const std::string& why) {
  if (dead_) return;
  VG_LOGW("remoting client {}: handshake refused: {} ({})", id_, ErrcName(code), why);
  SendWelcome(code);
  Reap();
}

void Session::OnHandshakeTimeout(int, short, void* arg) {
  auto* s = static_cast<Session*>(arg);
  if (!s->pending()) return;
  ++s->owner_.stats_.refused;
  s->Refuse(Errc::kTimeout, fmt::format("no Hello within {} ms", s->owner_.limits_.handshake_timeout_ms));
}

void Session::OnResume(int, short, void* arg) { static_cast<Session*>(arg)->Process(); }

uint64_t Session::granularity() const { return owner_.limits_.time_granularity_ns; }

void Session::OnTick(int, short, void* arg) {
  auto* s = static_cast<Session*>(arg);
  if (s->dead_) return;
  s->RetireDone();
  s->Process();
}

uint64_t Session::Tick(uint64_t ns) const {
  const uint64_t g = granularity();
  return (ns + g - 1) / g * g;
}

void Session::ArmTick(uint64_t due) {
  if (!tick_ev_) return;
  if (evtimer_pending(tick_ev_, nullptr) && tick_due_ns_ <= due) return;
  const uint64_t now = NowNs();
  const uint64_t wait_ns = due > now ? due - now : 0;
  // Rounded up: early is only a second turn (the checks re-arm), late by a microsecond is noise.
  const uint64_t wait_us = (wait_ns + 999) / 1000;
  timeval tv{static_cast<time_t>(wait_us / 1'000'000), static_cast<suseconds_t>(wait_us % 1'000'000)};
  tick_due_ns_ = due;
  evtimer_add(tick_ev_, &tv);
}

void Session::Yield() {
  static const timeval kNextTurn{0, 0};
  evtimer_add(resume_ev_, &kNextTurn);
}

void Session::Defer(std::chrono::nanoseconds wait) {
  // What is batched already goes to the GPU meanwhile.
  if (auto f = Flush(); !f.ok()) Report(f.code(), pending_pos_, f.error().what);
  const int64_t us = std::max<int64_t>(std::chrono::duration_cast<std::chrono::microseconds>(wait).count(), 1);
  const timeval tv{static_cast<time_t>(us / 1000000), static_cast<suseconds_t>(us % 1000000)};
  evtimer_add(resume_ev_, &tv);
}

Session::~Session() {
  if (sock_ev_) event_free(sock_ev_);
  if (wake_ev_) event_free(wake_ev_);
  if (done_ev_) event_free(done_ev_);
  if (resume_ev_) event_free(resume_ev_);
  if (deadline_ev_) event_free(deadline_ev_);
  if (tick_ev_) event_free(tick_ev_);
  // In-flight submissions keep their buffers alive (refcounted) and signal done_ through
  // their own shared_ptr, so nothing here waits for the GPU.
}

void Session::Reap() {
  dead_ = true;
  if (sock_ev_) event_del(sock_ev_);
  if (wake_ev_) event_del(wake_ev_);
  if (done_ev_) event_del(done_ev_);
  if (resume_ev_) event_del(resume_ev_);
  if (deadline_ev_) event_del(deadline_ev_);
  if (tick_ev_) event_del(tick_ev_);
  owner_.ScheduleReap();
}

void Session::OnSocket(int fd, short, void* arg) {
  auto* s = static_cast<Session*>(arg);
  if (s->dead_) return;
  if (!s->running_) {
    auto r = s->Handshake();
    if (!r.ok()) {
      VG_LOGW("remoting client {}: handshake refused: {}", s->id_, r.error().ToString());
      ++s->owner_.stats_.refused;
      // A malformed Hello is a fault; a full listener, a hang-up or an i/o error is not.
      if (r.code() != Errc::kLimitExceeded && r.code() != Errc::kPeerClosed && r.code() != Errc::kIo)
        s->owner_.CountFault(r.code());
      s->SendWelcome(r.code());
      s->Reap();
    }
    return;
  }
  // After the handshake the socket carries nothing: EOF (or anything else) ends the client.
  std::byte b[64];
  ssize_t n = ::recv(fd, b, sizeof(b), MSG_DONTWAIT);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  VG_LOGI("remoting client {}: disconnected", s->id_);
  s->Reap();
}

Result<> Session::Handshake() {
  w::Hello hello{};
  iovec iov{&hello, sizeof(hello)};
  alignas(cmsghdr) char cbuf[CMSG_SPACE(4 * sizeof(int))];
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = cbuf;
  msg.msg_controllen = sizeof(cbuf);
  ssize_t n = ::recvmsg(sock_.Get(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return Ok();
  VG_ERROR_IF(n == 0, Errc::kPeerClosed, "closed before the handshake");
  VG_ERROR_IF(n < 0, Errc::kIo, "recvmsg: {}", std::strerror(errno));
  std::vector<UniqueFd> fds;  // own every fd received before any check can return
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < k; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      fds.emplace_back(fd);
    }
  }
  VG_ERROR_IF(msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC), Errc::kBadMessage, "hello truncated");
  VG_ERROR_IF(static_cast<size_t>(n) != sizeof(hello), Errc::kBadMessage, "hello of {} bytes", n);
  VG_ERROR_IF(hello.magic != w::kMagic || hello.version != w::kVersion, Errc::kUnsupported,
              "magic {:#x} version {}", hello.magic, hello.version);
  VG_ERROR_IF(fds.size() != 2, Errc::kBadFdCount, "{} fds, want 2 (area memfd, wake eventfd)", fds.size());
  VG_ERROR_IF(owner_.running_clients() >= owner_.limits_.max_clients, Errc::kLimitExceeded, "over {} clients",
              owner_.limits_.max_clients);
  VG_ERROR_IF(!IsPowerOfTwo(hello.ring_size) || hello.ring_size < w::kMinRingSize || hello.ring_size > w::kMaxRingSize,
              Errc::kInvalidArgument, "ring size {:#x}", hello.ring_size);
  VG_ERROR_IF(hello.heap_size % kPageSize != 0 || hello.heap_size > w::kMaxHeapSize || hello.reserved != 0,
              Errc::kInvalidArgument, "heap size {:#x}", hello.heap_size);
  const uint64_t area_size = w::AreaSize(hello.ring_size, hello.heap_size);
  struct stat st{};
  VG_ERROR_IF(::fstat(fds[0].Get(), &st) != 0 || !S_ISREG(st.st_mode), Errc::kBadMessage, "area fd is not a memfd");
  VG_ERROR_IF(static_cast<uint64_t>(st.st_size) < area_size, Errc::kOutOfBounds, "area of {} B < {} B", st.st_size,
              area_size);
  // A client that shrank the memfd later would turn our loads into SIGBUS: demand the seal.
  int seals = ::fcntl(fds[0].Get(), F_GET_SEALS);
  VG_ERROR_IF(seals < 0 || !(seals & F_SEAL_SHRINK), Errc::kAccessDenied, "area memfd lacks F_SEAL_SHRINK");
  if (auto r = CheckIsEventFd(fds[1].Get()); !r) return MakeError(Errc::kBadMessage, "wake fd: {}", r.error().what);
  VG_TRY_ASSIGN(area_, Mapping::Map(fds[0], ByteSize{area_size}, 0));
  ring_size_ = hello.ring_size;
  heap_size_ = hello.heap_size;
  wake_ = EventFd::Adopt(std::move(fds[1]));
  VG_TRY_ASSIGN(reply_, EventFd::Create(true));
  VG_TRY_ASSIGN(auto done, EventFd::Create(true));
  done_ = std::make_shared<EventFd>(std::move(done));
  // The server starts idle: the client's first publish kicks it.
  head_ = 0;
  PublishHead();
  SetFlags(w::kStatusIdle);
  wake_ev_ = event_new(owner_.base_, wake_.Get(), EV_READ | EV_PERSIST, &Session::OnWake, this);
  done_ev_ = event_new(owner_.base_, done_->Get(), EV_READ | EV_PERSIST, &Session::OnDone, this);
  VG_ERROR_IF(!wake_ev_ || !done_ev_, Errc::kInternal, "event_new failed");
  event_add(wake_ev_, nullptr);
  event_add(done_ev_, nullptr);
  running_ = true;
  if (deadline_ev_) event_del(deadline_ev_);
  ++owner_.stats_.accepted;
  SendWelcome(Errc::kOk);
  VG_LOGI("remoting client {}: ring {} KiB, heap {} KiB", id_, ring_size_ >> 10, heap_size_ >> 10);
  return Ok();
}

void Session::SendWelcome(Errc status) {
  w::Welcome wl{w::kMagic, w::kVersion, static_cast<uint32_t>(status), id_, owner_.limits_.max_objects, 0,
                owner_.limits_.max_bytes};
  iovec iov{&wl, sizeof(wl)};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(int))] = {};
  if (status == Errc::kOk) {
    msg.msg_control = cbuf;
    msg.msg_controllen = sizeof(cbuf);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    int fd = reply_.Get();
    std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
  }
  (void)::sendmsg(sock_.Get(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
}

void Session::OnWake(int, short, void* arg) {
  auto* s = static_cast<Session*>(arg);
  ++s->owner_.stats_.wakes;
  // The wake eventfd is the client's (same open file description): it may be blocking,
  // and this callback also runs when nothing is pending.
  (void)s->wake_.TryDrain();
  s->Process();
}

void Session::OnDone(int, short, void* arg) {
  auto* s = static_cast<Session*>(arg);
  (void)s->done_->Drain();
  s->RetireDone();
  s->Process();
}

void Session::RetireDone() {
  while (!inflight_.empty() && inflight_.front().first->Done()) {
    auto [tok, pos] = inflight_.front();
    if (granularity()) {
      // What waits for this submission (a FENCE or READ reply, ring space behind the
      // in-flight bound, a failure report) is seen by the client only from its tick on.
      const auto at = tok->DoneAt();
      const uint64_t done = at ? SteadyNs(*at) : NowNs();
      if (NowNs() < Tick(done)) return ArmTick(Tick(done));
      gpu_done_ns_ = std::max(gpu_done_ns_, done);
    }
    inflight_.pop_front();
    auto st = tok->Status();
    if (!st.ok()) Report(st.code(), pos, "submission failed: " + st.error().what);
  }
}

void Session::Report(Errc code, uint32_t pos, const std::string& what) {
  ++owner_.stats_.errors;
  owner_.CountFault(code);
  // A quarantined client that keeps sending gets one line (the monitor's), not one per command.
  Log(code == Errc::kQuarantined ? LogLevel::kDebug : LogLevel::kWarn, "remoting client {}: command at {:#x} refused: {} ({})",
      id_, pos, ErrcName(code), what);
  w::StoreShared<uint32_t>(area(), w::kStatusErrorCodeOffset, static_cast<uint32_t>(code));
  w::StoreShared<uint32_t>(area(), w::kStatusErrorOffsetOffset, pos);
  w::StoreShared<uint32_t>(area(), w::kStatusErrorCountOffset, ++error_count_);
  (void)reply_.TrySignal();
}

void Session::Drop(Errc code, const std::string& what) {
  ++owner_.stats_.dropped;
  // DEAD before the error count moves: a client that sees the new error sees DEAD too.
  SetFlags(w::kStatusDead);
  Report(code, head_, what);
  VG_LOGW("remoting client {}: dropped ({})", id_, ErrcName(code));
  Reap();
}

Result<> Session::Flush() {
  if (pending_.ops.empty()) return Ok();
  engine::Submission s = std::move(pending_);
  pending_ = {};
  s.guest_submissions = 1;  // one client Submit: what a rate limit counts (F7)
  s.cost = pending_cost_;
  pending_cost_ = 0;
  std::shared_ptr<EventFd> done = done_;
  engine::Completion comp;
  comp.callback = [done](const Result<>&) { (void)done->Signal(); };
  ++owner_.stats_.submissions;
  VG_TRY_ASSIGN(auto tok, owner_.engine_.Submit(std::move(s), std::move(comp)));
  inflight_.emplace_back(std::move(tok), pending_pos_);
  return Ok();
}

Result<> Session::ValidateOnEngine(const Command& c) const {
  // Device limits (group counts, binding alignment, maxStorageBufferRange) on the one op
  // alone, so a refusal names this command rather than the whole batch.
  engine::Submission one;
  if (const auto* d = std::get_if<DispatchCommand>(&c.payload)) {
    std::vector<engine::BufferRange> binds;
    for (const auto& b : d->bindings) binds.push_back({Buffer(b.id), ByteSize{b.offset}, ByteSize{b.size}});
    one.Dispatch(d->head.kernel, {d->head.groups[0], d->head.groups[1], d->head.groups[2]}, std::move(binds), d->push);
  } else if (const auto* cp = std::get_if<w::CopyCmd>(&c.payload)) {
    one.Copy(Buffer(cp->src), ByteSize{cp->src_offset}, Buffer(cp->dst), ByteSize{cp->dst_offset}, ByteSize{cp->size});
  } else if (const auto* f = std::get_if<w::FillCmd>(&c.payload)) {
    one.Fill(Buffer(f->id), ByteSize{f->offset}, ByteSize{f->size}, f->value);
  } else {
    return Ok();
  }
  return owner_.engine_.Validate(one);
}

engine::BufferRef Session::Charged(engine::BufferRef raw, uint64_t size, std::shared_ptr<Mapping> memory) {
  // The quota holds a buffer's bytes until its last use ends, not until DESTROY: the
  // session's map, a queued submission and an in-flight one each hold this reference, and
  // whichever drops it last (the loop, or the engine's completion thread) refunds the
  // bytes through released_ and wakes the loop, which may have a CREATE waiting for them.
  engine::Buffer* p = raw.get();
  return engine::BufferRef(p, [raw = std::move(raw), memory = std::move(memory), released = released_, done = done_,
                               size](engine::Buffer*) mutable {
    raw.reset();
    memory.reset();  // after the engine's buffer, which points into it
    released->fetch_add(size);
    (void)done->Signal();  // ours, never shared: a plain non-blocking write
  });
}

uint64_t Session::SubmissionBudget() const {
  return mediator::SubmissionBudget(owner_.engine_.PrefersSmallSubmissions(), owner_.engine_.Info().parallel_groups);
}

uint64_t Session::Chunk() const { return std::min(mediator::kTransferChunkBytes, SubmissionBudget()); }

Result<bool> Session::Room(uint64_t cost) {
  if (pending_.ops.empty()) return true;
  if (pending_.ops.size() < kMaxOpsPerBatch && pending_cost_ + cost <= SubmissionBudget()) return true;
  VG_TRY(Flush());
  // The client's share of the engine queue is full: the rest of this command next turn,
  // once a submission of its has completed (OnDone).
  return inflight_.size() < kMaxInflightPerClient;
}

bool Session::CopyStep(std::span<std::byte> dst, std::span<const std::byte> src, uint64_t& budget) {
  const uint64_t n = std::min<uint64_t>(src.size() - copy_done_, budget);
  std::memcpy(dst.data() + copy_done_, src.data() + copy_done_, n);
  copy_done_ += n;
  budget -= n;
  if (copy_done_ < src.size()) return false;
  copy_done_ = 0;
  return true;
}

Result<bool> Session::Execute(const Command& c) {
  const uint32_t pos = backlog_pos_ + static_cast<uint32_t>(cursor_);
  if (const auto* cr = std::get_if<w::CreateBufferCmd>(&c.payload)) {
    // Engine::CreateBuffer zeroes the whole buffer on this thread. A buffer larger than a
    // turn's copy budget is memfd pages instead: zero by construction, supplied by the
    // kernel when first touched (by a bounded WRITE turn, or the GPU), so a 256 MiB CREATE
    // costs the loop an mmap, not a 256 MiB memset. (At most max_bytes / 4 MiB = 128 such
    // mappings per client; the fd is closed at once.)
    engine::BufferRef buf;
    std::shared_ptr<Mapping> memory;
    if (cr->size > kMaxCopyBytesPerTurn) {
      VG_TRY_ASSIGN(UniqueFd fd, CreateMemFd("vgpud-remoting-buffer", ByteSize{cr->size}));
      VG_TRY_ASSIGN(Mapping m, Mapping::Map(fd, ByteSize{cr->size}, 0));
      memory = std::make_shared<Mapping>(std::move(m));
      VG_TRY_ASSIGN(buf, owner_.engine_.WrapHostMemory(memory->bytes()));
    } else {
      VG_TRY_ASSIGN(buf, owner_.engine_.CreateBuffer(ByteSize{cr->size}));
    }
    objects_.DoCreate(*cr);
    buffers_[cr->id] = Charged(std::move(buf), cr->size, std::move(memory));
  } else if (const auto* de = std::get_if<w::DestroyBufferCmd>(&c.payload)) {
    VG_TRY_ASSIGN(const ObjectTable::Object* o, objects_.Lookup(de->id));
    objects_.Retain(o->size);  // still charged until the last reference dies (Charged)
    objects_.DoDestroy(de->id);
    buffers_.erase(de->id);  // pending and in-flight submissions hold their own reference
  } else if (const auto* wr = std::get_if<w::WriteCmd>(&c.payload)) {
    // The heap is shared: read each byte once, straight into the buffer (no re-read); a
    // large WRITE spans turns, each byte still copied once.
    auto dst = Buffer(wr->id)->Map().subspan(wr->offset, wr->size);
    if (!CopyStep(dst, heap().subspan(wr->heap_offset, wr->size), turn_copy_budget_)) return false;
  } else if (const auto* rd = std::get_if<w::ReadCmd>(&c.payload)) {
    auto src = Buffer(rd->id)->Map().subspan(rd->offset, rd->size);
    if (!CopyStep(heap().subspan(rd->heap_offset, rd->size), src, turn_copy_budget_)) return false;
    w::StoreShared<uint64_t>(area(), w::kStatusReplyOffset, rd->seq);
    (void)reply_.TrySignal();
  } else if (const auto* d = std::get_if<DispatchCommand>(&c.payload)) {
    std::vector<engine::BufferRange> binds;
    for (const auto& b : d->bindings) binds.push_back({Buffer(b.id), ByteSize{b.offset}, ByteSize{b.size}});
    if (!cut_) {
      VG_TRY_ASSIGN(mediator::DispatchCut cut,
                    mediator::DispatchCut::Make(d->head.kernel, {d->head.groups[0], d->head.groups[1], d->head.groups[2]},
                                                d->push, SubmissionBudget(), owner_.engine_.Info().parallel_groups));
      cut_ = cut;
    }
    for (; gpu_done_ < cut_->pieces(); ++gpu_done_) {
      VG_TRY_ASSIGN(bool room, Room(cut_->piece_cost()));
      if (!room) return false;
      const mediator::DispatchPiece p = cut_->Piece(gpu_done_);
      pending_.Dispatch(d->head.kernel, p.groups, binds, d->push, p.base);
      pending_cost_ += cut_->piece_cost();
      pending_pos_ = pos;
    }
  } else if (const auto* cp = std::get_if<w::CopyCmd>(&c.payload)) {
    while (gpu_done_ < cp->size) {
      const uint64_t n = std::min(cp->size - gpu_done_, Chunk());
      VG_TRY_ASSIGN(bool room, Room(n));
      if (!room) return false;
      pending_.Copy(Buffer(cp->src), ByteSize{cp->src_offset + gpu_done_}, Buffer(cp->dst),
                    ByteSize{cp->dst_offset + gpu_done_}, ByteSize{n});
      pending_cost_ += n;
      pending_pos_ = pos;
      gpu_done_ += n;
    }
  } else if (const auto* f = std::get_if<w::FillCmd>(&c.payload)) {
    while (gpu_done_ < f->size) {
      const uint64_t n = std::min(f->size - gpu_done_, Chunk());  // multiples of 4: Chunk() is
      VG_TRY_ASSIGN(bool room, Room(n));
      if (!room) return false;
      pending_.Fill(Buffer(f->id), ByteSize{f->offset + gpu_done_}, ByteSize{n}, f->value);
      pending_cost_ += n;
      pending_pos_ = pos;
      gpu_done_ += n;
    }
  } else if (const auto* fe = std::get_if<w::FenceCmd>(&c.payload)) {
    w::StoreShared<uint64_t>(area(), w::kStatusFenceOffset, fe->value);
    (void)reply_.TrySignal();
  }
  ++owner_.stats_.commands;
  if (pending_.ops.size() >= kMaxOpsPerBatch) VG_TRY(Flush());
  return true;
}

void Session::Process() {
  if (dead_ || !running_) return;
  SetFlags(0);  // awake: the client need not kick until we say idle again
  int refills = 0;
  int commands = 0;
  turn_copy_budget_ = kMaxCopyBytesPerTurn;
  for (;;) {
    if (cursor_ == backlog_.size()) {
      // Everything copied so far is done (or queued): look for more.
      const uint32_t tail = w::LoadShared<uint32_t>(area(), w::kTailOffset);
      const uint32_t avail = tail - head_;
      if (tail % w::kAlign != 0) return Drop(Errc::kMisaligned, fmt::format("tail {:#x} not a multiple of 8", tail));
      if (avail > ring_size_)
        return Drop(Errc::kOutOfBounds, fmt::format("tail {:#x} is {:#x} bytes past head {:#x}, ring holds {:#x}",
                                                    tail, avail, head_, ring_size_));
      if (avail == 0) {
        if (auto r = Flush(); !r.ok()) Report(r.code(), pending_pos_, r.error().what);
        // Idle protocol (Dekker with the client): set IDLE, then re-read the tail. A client
        // that published after our read sees IDLE and kicks; one that published before is
        // seen here.
        SetFlags(w::kStatusIdle);
        std::atomic_thread_fence(std::memory_order_seq_cst);
        if (w::LoadShared<uint32_t>(area(), w::kTailOffset) != head_) {
          SetFlags(0);
          continue;
        }
        return;
      }
      if (++refills > kMaxRefillsPerTurn) return Yield();
      // Copy, once, out of the shared ring (it may wrap).
      backlog_.resize(avail);
      const std::byte* ring = area() + w::kRingOffset;
      const uint32_t start = head_ & (ring_size_ - 1);
      const uint32_t first = std::min(avail, ring_size_ - start);
      std::memcpy(backlog_.data(), ring + start, first);
      std::memcpy(backlog_.data() + first, ring, avail - first);
      backlog_pos_ = head_;
      cursor_ = 0;
      copied_ns_ = granularity() ? NowNs() : 0;
    }

    if (++commands > kMaxCommandsPerTurn || turn_copy_budget_ == 0) return Yield();
    const uint32_t pos = backlog_pos_ + static_cast<uint32_t>(cursor_);
    Decoded d = DecodeCommand(backlog_, cursor_);
    if (d.cmd.ok()) {
      const Command& c = *d.cmd;
      const OpDesc& desc = kOpTable[static_cast<uint16_t>(c.op)];
      if (desc.kind == OpKind::kGpu && pending_.ops.empty() && inflight_.size() >= kMaxInflightPerClient)
        return;  // resumed by OnDone
      if (desc.kind == OpKind::kOrdered) {
        if (auto r = Flush(); !r.ok()) Report(r.code(), pending_pos_, r.error().what);
        if (!inflight_.empty()) return;  // resumed by OnDone once the GPU caught up
        if (desc.replies && granularity()) {
          // Its answer shows at the tick after it could first have been given: once the
          // client published it and the GPU work before it had completed. Commands published
          // together go out together at that tick; the loop never waits for it.
          const uint64_t due = Tick(std::max(copied_ns_, gpu_done_ns_));
          if (NowNs() < due) return ArmTick(due);
        }
      }
      // F7: each command is one submission to the vGPU's fault monitor (a WRITE/READ continued
      // from an earlier turn was admitted then).
      const bool continued = copy_done_ != 0 || gpu_done_ != 0;
      const FaultGate::Admission admitted = !continued ? owner_.Admit() : FaultGate::Admission{};
      if (admitted.code == Errc::kOk && admitted.wait.count() > 0) return Defer(admitted.wait);
      if (uint64_t freed = released_->exchange(0)) objects_.Release(freed);
      Result<> r = admitted.code == Errc::kOk ? ValidateCommand(c, objects_, heap_size_)
                                              : Result<>(MakeError(admitted.code, "{}", kQuarantinedWhy));
      if (r.code() == Errc::kBusy) {
        // A CREATE that fits once destroyed buffers still in use are let go: wait for the
        // GPU (queued work first) instead of refusing; their release wakes us (Charged).
        if (auto f = Flush(); !f.ok()) Report(f.code(), pending_pos_, f.error().what);
        return;
      }
      if (r.ok()) r = ValidateOnEngine(c);
      if (r.ok()) {
        auto done = Execute(c);
        if (done.ok() && !*done) return Yield();  // a WRITE/READ continues next turn
        if (!done.ok()) r = done.error();
      }
      if (!r.ok()) {
        // A refused READ publishes no reply_seq (its seq is the client's word, unchecked):
        // the error count and the reply eventfd wake a waiting client instead.
        Report(r.code(), pos, fmt::format("{}: {}", desc.name, r.error().what));
      }
      cursor_ += c.size;
    } else {
      const FaultGate::Admission admitted = owner_.Admit();
      if (admitted.code == Errc::kOk && admitted.wait.count() > 0) return Defer(admitted.wait);
      if (admitted.code != Errc::kOk)
        Report(admitted.code, pos, kQuarantinedWhy);
      else
        Report(d.cmd.code(), pos, d.cmd.error().what);
      // Resynchronise: skip a framed command, or everything up to the published tail (the
      // client publishes whole commands, so the tail is always a command boundary).
      cursor_ = d.advance ? cursor_ + d.advance : backlog_.size();
    }
    copy_done_ = 0;  // the cursor moved on: no WRITE/READ is half copied, no GPU command half packed
    gpu_done_ = 0;
    cut_.reset();
    head_ = backlog_pos_ + static_cast<uint32_t>(cursor_);
    PublishHead();
    if (dead_) return;
  }
}

}  // namespace

Result<std::unique_ptr<Listener>> Listener::Create(event_base* base, engine::Engine& engine, std::string path,
                                                   Limits limits) {
  VG_INVALID_IF(path.empty(), "empty socket path");
  auto l = std::make_unique<ListenerImpl>(base, engine, std::move(path), limits);
  VG_TRY(l->Init());
  return std::unique_ptr<Listener>(std::move(l));
}

Result<std::unique_ptr<Listener>> Listener::CreateOnSocket(event_base* base, engine::Engine& engine,
                                                           UniqueFd listening, std::string name, Limits limits) {
  VG_INVALID_IF(!listening.Valid(), "no listening socket");
  auto l = std::make_unique<ListenerImpl>(base, engine, std::move(name), limits, /*owns_path=*/false);
  VG_TRY(l->Init(std::move(listening)));
  return std::unique_ptr<Listener>(std::move(l));
}

Result<std::unique_ptr<Listener>> Listener::CreateUnbound(event_base* base, engine::Engine& engine, Limits limits) {
  auto l = std::make_unique<ListenerImpl>(base, engine, std::string(), limits);
  VG_TRY(l->Init());
  return std::unique_ptr<Listener>(std::move(l));
}

}  // namespace vg::remoting
