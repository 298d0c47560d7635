#include "tools/vgpud/metrics.h"

#include <arpa/inet.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>

#include "tools/vgpud/worker_channel.h"

#ifndef VGPUD_VERSION
#define VGPUD_VERSION "unknown"  // tools/meson.build sets the project's version
#endif

namespace vg::daemon {
namespace {

using Clock = std::chrono::steady_clock;
namespace ch = channel;

// Help text of the known counters; a counter added to the channel's table later is exported
// all the same, with a help line that names it.
constexpr std::pair<std::string_view, std::string_view> kCounterHelp[] = {
    {"doorbells", "Doorbell rings the device saw."},
    {"submissions", "Ring submissions audited and queued to the engine (restarts at 0 on a device reset)."},
    {"mmio_refusals", "Register accesses refused."},
    {"command_refusals", "Submissions whose commands the audit refused."},
    {"resets", "Device resets."},
    {"irqs", "Interrupts raised to the guest."},
    {"commands_audited", "Commands that passed the audit."},
    {"plans_executed", "Audited plans the engine executed."},
    {"vfio_user_clients", "Connected vfio-user clients (0 or 1)."},
    {"remoting_clients", "Connected remoting clients."},
    {"remoting_commands", "Remoting commands replayed."},
    {"remoting_errors", "Remoting commands refused."},
    {"gpu_time_ns", "Engine time charged to the vGPU."},
    {"queue_wait_ns", "Time the vGPU's work waited for the engine (scheduler, rate limits)."},
    {"bytes_read", "Guest memory the device read for its commands, in bytes."},
    {"bytes_written", "Guest memory the device wrote, in bytes."},
    {"rate_limited", "Submissions a rate limit deferred."},
    {"faults", "Refused or faulted commands counted by the fault monitor."},
    {"throttled_ns", "Time spent throttled for faults."},
    {"quarantined_ns", "Time spent quarantined."},
    {"health", "Fault health: 0 ok, 1 throttled, 2 quarantined."},
    {"health_reason",
     "Why not ok: 0 none, 1 command refusals, 2 MMIO refusals, 3 DMA faults, 4 remoting errors, 5 on probation "
     "after a reset lifted a quarantine."},
    {"health_fault_rate", "The highest faults per second over the fault window since the health last changed."},
    {"plans_inline", "Host-op-only plans completed on the worker's loop (inline completion)."},
    {"plans_inline_submitted", "Small engine plans submitted by the loop or the retire thread (inline submission)."},
    {"plans_coalesced", "Plans whose work joined another plan's engine submission."},
    {"tail_rereads", "Tail shadow re-reads of idle notify."},
    {"flips_requested", "Scan-out commits (enable or flip) the guest made that passed the checks."},
    {"flips_presented", "Scan-out commits that took effect at a frame boundary."},
    {"flips_deferred", "Scan-out commits the frame limit held past at least one frame boundary."},
    {"flips_replaced", "Scan-out commits a later commit replaced before they took effect."},
    {"display_fps", "Scan-out commits presented per second, over the last whole second the frame clock ran."},
};

constexpr std::string_view kRejectNames[] = {"too_many_clients", "deadline", "too_large",
                                             "bad_request",      "method",   "not_found"};
static_assert(std::size(kRejectNames) == static_cast<size_t>(MetricsReject::kCount));

// WorkerStatus::state's values (workers.cc names them); each vGPU gets one sample per state.
constexpr std::string_view kWorkerStates[] = {"starting", "running", "restarting", "failed", "stopping"};

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// HELP text: backslash and newline escaped (format 0.0.4).
std::string EscapeHelp(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

// Shortest text that reads back as the same double (Go's ParseFloat, as Prometheus parses).
std::string Num(double v) { return fmt::format("{}", v); }
std::string Num(uint64_t v) { return fmt::format("{}", v); }

// One metric family: HELP, TYPE, then every sample of it, together (the format requires a
// family's samples to be contiguous).
class Page {
 public:
  void Family(std::string_view name, std::string_view type, std::string_view help) {
    fmt::format_to(std::back_inserter(out_), "# HELP {} {}\n# TYPE {} {}\n", name, EscapeHelp(help), name, type);
    name_ = name;
  }
  // labels: already-rendered `k="v",...` (may be empty)
  void Sample(std::string_view labels, std::string_view value) {
    out_ += name_;
    if (!labels.empty()) fmt::format_to(std::back_inserter(out_), "{{{}}}", labels);
    fmt::format_to(std::back_inserter(out_), " {}\n", value);
  }
  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
  std::string name_;
};

std::string Label(std::string_view k, std::string_view v) { return fmt::format("{}=\"{}\"", k, EscapeLabelValue(v)); }

std::string VgpuLabels(const VgpuSample& v, std::string_view parent) {
  return Label("uuid", v.uuid) + "," + Label("type", v.status.type) + "," + Label("parent", parent);
}

Result<uint16_t> ParsePort(std::string_view s) {
  uint32_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  VG_INVALID_IF(s.empty() || ec != std::errc() || p != s.data() + s.size() || v > 65535, "'{}' is not a port (0..65535)",
                s);
  return static_cast<uint16_t>(v);
}

std::string AddressText(const sockaddr_storage& a) {
  char buf[INET6_ADDRSTRLEN] = {};
  if (a.ss_family == AF_INET6) {
    const auto& s6 = reinterpret_cast<const sockaddr_in6&>(a);
    ::inet_ntop(AF_INET6, &s6.sin6_addr, buf, sizeof buf);
    return fmt::format("[{}]:{}", buf, ntohs(s6.sin6_port));
  }
  const auto& s4 = reinterpret_cast<const sockaddr_in&>(a);
  ::inet_ntop(AF_INET, &s4.sin_addr, buf, sizeof buf);
  return fmt::format("{}:{}", buf, ntohs(s4.sin_port));
}

void SendBestEffort(int fd, std::string_view s) { (void)::send(fd, s.data(), s.size(), MSG_DONTWAIT | MSG_NOSIGNAL); }

}  // namespace

std::string EscapeLabelValue(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

std::string CounterMetricName(std::string_view name, bool gauge) {
  if (gauge) return fmt::format("vgpud_{}", name);
  // Prometheus' base unit of time is the second.
  if (EndsWith(name, "_ns")) return fmt::format("vgpud_{}_seconds_total", name.substr(0, name.size() - 3));
  return fmt::format("vgpud_{}_total", name);
}

std::string RenderMetrics(const DaemonSample& d, const std::vector<VgpuSample>& vgpus, double scrape_seconds) {
  Page p;
  p.Family("vgpud_build_info", "gauge", "vgpud's version; always 1.");
  p.Sample(Label("version", d.version), "1");
  p.Family("vgpud_start_time_seconds", "gauge", "When the supervisor started, in seconds since the Unix epoch.");
  p.Sample("", Num(static_cast<double>(d.start_time_unix_ms) / 1000.0));
  if (d.vgpus_defined) {
    p.Family("vgpud_vgpus_defined", "gauge",
             "vGPU definitions (mdevctl format) on this parent, counted at most once a second.");
    p.Sample(Label("parent", d.parent), Num(*d.vgpus_defined));
  }
  uint64_t running = 0;
  for (const VgpuSample& v : vgpus) running += v.status.state == "running";
  p.Family("vgpud_vgpus_active", "gauge", "Active vGPUs: a worker starting, running, restarting or failed.");
  p.Sample(Label("parent", d.parent), Num(static_cast<uint64_t>(vgpus.size())));
  p.Family("vgpud_vgpus_running", "gauge", "vGPUs whose worker is running.");
  p.Sample(Label("parent", d.parent), Num(running));
  p.Family("vgpud_metrics_scrapes_total", "counter", "Scrapes of this endpoint answered, this one included.");
  p.Sample("", Num(d.scrapes));
  p.Family("vgpud_metrics_rejected_total", "counter", "Connections to this endpoint turned away, by reason.");
  for (size_t r = 0; r < d.rejected.size(); ++r) p.Sample(Label("reason", kRejectNames[r]), Num(d.rejected[r]));

  // Per vGPU: the worker, as the supervisor sees it.
  p.Family("vgpud_worker_state", "gauge", "The vGPU's worker state: 1 for the current one.");
  for (const VgpuSample& v : vgpus) {
    const std::string l = VgpuLabels(v, d.parent);
    for (std::string_view s : kWorkerStates) p.Sample(l + "," + Label("state", s), v.status.state == s ? "1" : "0");
  }
  p.Family("vgpud_worker_restarts_total", "counter", "Times the worker was restarted after it ended unasked.");
  for (const VgpuSample& v : vgpus) p.Sample(VgpuLabels(v, d.parent), Num(uint64_t{v.status.restarts}));
  p.Family("vgpud_worker_ends_total", "counter", "Worker processes that ended unasked, by kind.");
  for (const VgpuSample& v : vgpus) {
    const std::string l = VgpuLabels(v, d.parent);
    for (size_t k = 0; k < v.status.ends.size(); ++k)
      p.Sample(l + "," + Label("kind", EndKindName(static_cast<EndKind>(k))), Num(v.status.ends[k]));
  }
  // Usage as the supervisor reads it from /proc: only while a process runs.
  struct Usage {
    std::string_view name, help;
    uint64_t (*get)(const WorkerStatus&);
  };
  static constexpr Usage kUsage[] = {
      {"vgpud_worker_resident_memory_bytes", "Resident memory of the worker process (/proc VmRSS).",
       [](const WorkerStatus& s) { return s.rss_bytes; }},
      {"vgpud_worker_open_fds", "Open descriptors of the worker process.",
       [](const WorkerStatus& s) { return uint64_t{s.fds}; }},
      {"vgpud_worker_threads", "Threads of the worker process.",
       [](const WorkerStatus& s) { return uint64_t{s.threads}; }},
  };
  for (const Usage& u : kUsage) {
    p.Family(u.name, "gauge", u.help);
    for (const VgpuSample& v : vgpus)
      if (v.status.pid > 0) p.Sample(VgpuLabels(v, d.parent), Num(u.get(v.status)));
  }
  p.Family("vgpud_worker_heartbeat_age_seconds", "gauge", "Time since the running worker last answered a ping.");
  for (const VgpuSample& v : vgpus)
    if (v.status.heartbeat_age_ms)
      p.Sample(VgpuLabels(v, d.parent), Num(static_cast<double>(*v.status.heartbeat_age_ms) / 1000.0));
  p.Family("vgpud_worker_start_latency_seconds", "gauge", "Spawn to serving, the worker's last start.");
  for (const VgpuSample& v : vgpus)
    if (v.status.start_latency_us)
      p.Sample(VgpuLabels(v, d.parent), Num(static_cast<double>(v.status.start_latency_us) / 1e6));

  // Per vGPU: the supervisor's scheduler (present while the worker runs under --sched).
  p.Family("vgpud_sched_state", "gauge", "The vGPU's state in the host scheduler: 1 for the current one.");
  for (const VgpuSample& v : vgpus)
    if (v.status.sched)
      for (SchedState st : {SchedState::kIdle, SchedState::kWaiting, SchedState::kRunning})
        p.Sample(VgpuLabels(v, d.parent) + "," + Label("state", SchedStateName(st)), v.status.sched->state == st ? "1" : "0");
  struct SchedCounter {
    std::string_view name, help;
    double (*get)(const SchedEntryStatus&);
  };
  static constexpr SchedCounter kSched[] = {
      {"vgpud_sched_grants_total", "Grants of the engine the scheduler gave the vGPU.",
       [](const SchedEntryStatus& s) { return static_cast<double>(s.grants); }},
      {"vgpud_sched_preemptions_total", "Grants the scheduler asked the vGPU to yield.",
       [](const SchedEntryStatus& s) { return static_cast<double>(s.preemptions); }},
      {"vgpud_sched_wait_seconds_total", "Time the vGPU waited for a grant.",
       [](const SchedEntryStatus& s) { return static_cast<double>(s.wait_ns) / 1e9; }},
      {"vgpud_sched_charged_seconds_total", "Engine time charged to the vGPU while others wanted it.",
       [](const SchedEntryStatus& s) { return static_cast<double>(s.charged_ns) / 1e9; }},
      {"vgpud_sched_overruns_total", "--sched partitioned: grants that ran past the vGPU's slot (debt).",
       [](const SchedEntryStatus& s) { return static_cast<double>(s.overruns); }},
      {"vgpud_sched_overrun_seconds_total", "--sched partitioned: time the vGPU's grants ran past its slots.",
       [](const SchedEntryStatus& s) { return static_cast<double>(s.overrun_ns) / 1e9; }},
  };
  for (const SchedCounter& c : kSched) {
    p.Family(c.name, "counter", c.help);
    for (const VgpuSample& v : vgpus)
      if (v.status.sched) p.Sample(VgpuLabels(v, d.parent), Num(c.get(*v.status.sched)));
  }

  // Per vGPU: what the worker reported in its last pong, one family per entry of the
  // channel's table. A vGPU without a pong yet (starting, restarting) has no samples: a
  // restarted worker's counters start again at 0, which Prometheus' rate() treats as a reset.
  for (const ch::CounterName& c : ch::kCounterNames) {
    std::string help = fmt::format("Worker counter '{}'.", c.name);
    for (const auto& [n, h] : kCounterHelp)
      if (n == c.name) help = std::string(h);
    const bool ns = !c.gauge && EndsWith(c.name, "_ns");
    p.Family(CounterMetricName(c.name, c.gauge), c.gauge ? "gauge" : "counter", help);
    for (const VgpuSample& v : vgpus) {
      if (!v.status.counters) continue;
      const uint64_t raw = (*v.status.counters)[static_cast<size_t>(c.counter)];
      p.Sample(VgpuLabels(v, d.parent), ns ? Num(static_cast<double>(raw) / 1e9) : Num(raw));
    }
  }
  p.Family("vgpud_scrape_duration_seconds", "gauge", "Time this scrape took to collect and render, before this line.");
  p.Sample("", Num(scrape_seconds));
  return p.Take();
}

// ---- address ------------------------------------------------------------------------------

Result<MetricsEndpoint> ParseMetricsAddress(std::string_view spec, bool allow_remote) {
  std::string host = "127.0.0.1";
  std::string_view port = spec;
  bool v6 = false;
  if (!spec.empty() && spec.front() == '[') {
    const size_t close = spec.find("]:");
    VG_INVALID_IF(close == std::string_view::npos, "--metrics '{}': [IPV6]:PORT", spec);
    host = std::string(spec.substr(1, close - 1));
    port = spec.substr(close + 2);
    v6 = true;
  } else if (const size_t colon = spec.rfind(':'); colon != std::string_view::npos) {
    host = std::string(spec.substr(0, colon));
    port = spec.substr(colon + 1);
    VG_INVALID_IF(host.find(':') != std::string::npos, "--metrics '{}': an IPv6 address goes in brackets, [::1]:PORT",
                  spec);
  }
  if (host == "localhost") host = "127.0.0.1";
  auto p = ParsePort(port);
  VG_INVALID_IF(!p, "--metrics '{}': PORT, HOST:PORT or [IPV6]:PORT; {}", spec, p.error().what);
  MetricsEndpoint e;
  if (v6) {
    sockaddr_in6 a{};
    a.sin6_family = AF_INET6;
    a.sin6_port = htons(*p);
    VG_INVALID_IF(::inet_pton(AF_INET6, host.c_str(), &a.sin6_addr) != 1, "--metrics '{}': '{}' is not an IPv6 address",
                  spec, host);
    e.loopback = IN6_IS_ADDR_LOOPBACK(&a.sin6_addr) ||
                 (IN6_IS_ADDR_V4MAPPED(&a.sin6_addr) && a.sin6_addr.s6_addr[12] == 127);
    std::memcpy(&e.addr, &a, sizeof a);
    e.len = sizeof a;
  } else {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(*p);
    // Numeric only: resolving a name would be a DNS wait and a second source of truth.
    VG_INVALID_IF(::inet_pton(AF_INET, host.c_str(), &a.sin_addr) != 1,
                  "--metrics '{}': '{}' is not an IPv4 address (names other than localhost are not resolved)", spec,
                  host);
    e.loopback = (ntohl(a.sin_addr.s_addr) >> 24) == 127;
    std::memcpy(&e.addr, &a, sizeof a);
    e.len = sizeof a;
  }
  VG_ERROR_IF(!e.loopback && !allow_remote, Errc::kAccessDenied,
              "--metrics '{}' is not a loopback address: the endpoint has no authentication and its counters show "
              "every tenant's activity (when and how much each vGPU works); add --metrics-allow-remote to serve "
              "it there anyway",
              spec);
  return e;
}

// ---- server -------------------------------------------------------------------------------

struct MetricsServer::Client {
  MetricsServer* server = nullptr;
  UniqueFd fd;
  event* rev = nullptr;
  event* wev = nullptr;
  event* deadline = nullptr;
  std::string in;
  std::string out;
  size_t sent = 0;
  bool answered = false;
  bool lingering = false;  // answered in full: reading and discarding until the client closes
  ~Client() {
    for (event* e : {rev, wev, deadline})
      if (e) event_free(e);
  }
};

MetricsServer::MetricsServer(event_base* base, WorkerPool& pool, Options opts)
    : base_(base), pool_(pool), opts_(std::move(opts)) {}

Result<std::unique_ptr<MetricsServer>> MetricsServer::Create(event_base* base, WorkerPool& pool, Options opts) {
  std::unique_ptr<MetricsServer> s(new MetricsServer(base, pool, std::move(opts)));
  s->start_time_unix_ms_ = std::chrono::duration_cast<std::chrono::milliseconds>(
                               std::chrono::system_clock::now().time_since_epoch())
                               .count();
  const MetricsEndpoint& e = s->opts_.endpoint;
  s->listen_fd_ = UniqueFd(::socket(e.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  VG_ERROR_IF(!s->listen_fd_.Valid(), Errc::kIo, "metrics socket: {}", std::strerror(errno));
  const int one = 1;
  (void)::setsockopt(s->listen_fd_.Get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (e.addr.ss_family == AF_INET6) (void)::setsockopt(s->listen_fd_.Get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
  VG_ERROR_IF(::bind(s->listen_fd_.Get(), reinterpret_cast<const sockaddr*>(&e.addr), e.len) != 0, Errc::kIo,
              "metrics bind {}: {}", AddressText(e.addr), std::strerror(errno));
  VG_ERROR_IF(::listen(s->listen_fd_.Get(), 16) != 0, Errc::kIo, "metrics listen: {}", std::strerror(errno));
  sockaddr_storage bound{};
  socklen_t blen = sizeof bound;
  VG_ERROR_IF(::getsockname(s->listen_fd_.Get(), reinterpret_cast<sockaddr*>(&bound), &blen) != 0, Errc::kIo,
              "metrics getsockname: {}", std::strerror(errno));
  s->address_ = AddressText(bound);
  s->accept_ev_ = event_new(base, s->listen_fd_.Get(), EV_READ | EV_PERSIST, &MetricsServer::OnAccept, s.get());
  s->accept_backoff_ev_ = evtimer_new(base, &MetricsServer::OnAcceptBackoff, s.get());
  VG_ERROR_IF(!s->accept_ev_ || !s->accept_backoff_ev_ || event_add(s->accept_ev_, nullptr) != 0, Errc::kInternal,
              "metrics accept event");
  if (s->opts_.count_defined) {
    // The first count before anyone can scrape, so the gauge is there from the start.
    if (auto n = s->opts_.count_defined()) s->defined_ = static_cast<int64_t>(*n);
    s->count_asked_ = Clock::now();
    s->count_thread_ = std::thread([p = s.get()] { p->CounterMain(); });
  }
  return s;
}

MetricsServer::~MetricsServer() {
  {
    std::lock_guard lk(count_mu_);
    count_stop_ = true;
  }
  count_cv_.notify_all();
  if (count_thread_.joinable()) count_thread_.join();
  clients_.clear();
  if (accept_ev_) event_free(accept_ev_);
  if (accept_backoff_ev_) event_free(accept_backoff_ev_);
}

void MetricsServer::CounterMain() {
  std::unique_lock lk(count_mu_);
  for (;;) {
    count_cv_.wait(lk, [this] { return count_stop_ || count_wanted_; });
    if (count_stop_) return;
    count_wanted_ = false;
    lk.unlock();
    auto n = opts_.count_defined();
    if (n) defined_.store(static_cast<int64_t>(*n));
    else VG_LOGD("metrics: counting definitions: {}", n.error().ToString());
    lk.lock();
  }
}

void MetricsServer::OnAcceptBackoff(int, short, void* arg) {
  auto* self = static_cast<MetricsServer*>(arg);
  event_add(self->accept_ev_, nullptr);
}

void MetricsServer::OnAccept(int lfd, short, void* arg) {
  auto* self = static_cast<MetricsServer*>(arg);
  for (;;) {
    auto accepted = AcceptConnection(lfd);
    if (!accepted.ok()) {
      if (accepted.code() == Errc::kLimitExceeded) {
        // Out of descriptors: a level-triggered listener left armed would spin the loop.
        event_del(self->accept_ev_);
        timeval tv{0, kAcceptBackoffMs * 1000};
        evtimer_add(self->accept_backoff_ev_, &tv);
      }
      if (accepted.code() != Errc::kBusy) VG_LOGW("metrics: {}", accepted.error().what);
      return;
    }
    UniqueFd fd = std::move(accepted).value();
    if (self->clients_.size() >= self->opts_.limits.max_clients) {
      // Answered and closed at once: nothing of it stays with us.
      ++self->rejected_[static_cast<size_t>(MetricsReject::kTooManyClients)];
      // What already arrived is read first (once, bounded): closing on unread input would
      // reset the connection over the answer.
      char discard[4096];
      (void)::recv(fd.Get(), discard, sizeof discard, MSG_DONTWAIT);
      SendBestEffort(fd.Get(),
                     "HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 17\r\n"
                     "Connection: close\r\n\r\ntoo many clients\n");
      continue;
    }
    auto c = std::make_unique<Client>();
    Client* cp = c.get();
    c->server = self;
    const int cfd = fd.Get();
    c->fd = std::move(fd);
    c->rev = event_new(self->base_, cfd, EV_READ | EV_PERSIST, &MetricsServer::OnRead, cp);
    c->wev = event_new(self->base_, cfd, EV_WRITE | EV_PERSIST, &MetricsServer::OnWrite, cp);
    c->deadline = evtimer_new(self->base_, &MetricsServer::OnDeadline, cp);
    const timeval tv{self->opts_.limits.deadline_ms / 1000, (self->opts_.limits.deadline_ms % 1000) * 1000};
    if (!c->rev || !c->wev || !c->deadline || event_add(c->rev, nullptr) != 0 || evtimer_add(c->deadline, &tv) != 0)
      continue;  // dropped with its events
    self->clients_.emplace(cp, std::move(c));
  }
}

void MetricsServer::OnRead(int, short, void* arg) {
  auto* c = static_cast<Client*>(arg);
  c->server->ReadFrom(*c);
}

void MetricsServer::OnWrite(int, short, void* arg) {
  auto* c = static_cast<Client*>(arg);
  c->server->Flush(*c);
}

void MetricsServer::OnDeadline(int, short, void* arg) {
  auto* c = static_cast<Client*>(arg);
  MetricsServer* self = c->server;
  if (!c->answered) ++self->rejected_[static_cast<size_t>(MetricsReject::kDeadline)];
  self->Drop(*c);
}

void MetricsServer::Drop(Client& c) { clients_.erase(&c); }

void MetricsServer::Reject(Client& c, MetricsReject why, int code, std::string_view reason, std::string_view extra) {
  ++rejected_[static_cast<size_t>(why)];
  Answer(c, code, reason, std::string(reason) + "\n", extra);
}

void MetricsServer::ReadFrom(Client& c) {
  const size_t cap = opts_.limits.max_request;
  char buf[4096];
  if (c.lingering) {
    // Discarded, a bounded amount per turn of the loop: a fast sender gets no more of it.
    for (int i = 0; i < 16; ++i) {
      const ssize_t n = ::read(c.fd.Get(), buf, sizeof buf);
      if (n > 0 || (n < 0 && errno == EINTR)) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      Drop(c);  // the client closed (or reset): done
      return;
    }
    return;
  }
  for (;;) {
    // Never more than the cap (plus one buffer) held for a client.
    const ssize_t n = ::read(c.fd.Get(), buf, sizeof buf);
    if (n > 0) {
      c.in.append(buf, static_cast<size_t>(n));
      if (c.in.size() > cap) break;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    Drop(c);  // EOF before a whole request, or a reset: nothing to answer
    return;
  }
  // The request ends at its first empty line; its headers are not looked at.
  size_t end = c.in.find("\r\n\r\n");
  if (end == std::string::npos) end = c.in.find("\n\n");
  if (end == std::string::npos || end > cap) {
    if (c.in.size() > cap) Reject(c, MetricsReject::kTooLarge, 431, "Request Header Fields Too Large");
    return;
  }
  const size_t nl = c.in.find('\n');
  std::string_view line(c.in.data(), nl);
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  // METHOD SP TARGET SP HTTP/1.x, printable ASCII only.
  const size_t sp1 = line.find(' ');
  const size_t sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
  const bool printable =
      std::all_of(line.begin(), line.end(), [](char ch) { return ch > 0x20 ? ch < 0x7f : ch == ' '; });
  if (!printable || sp2 == std::string_view::npos || line.find(' ', sp2 + 1) != std::string_view::npos || sp1 == 0) {
    Reject(c, MetricsReject::kBadRequest, 400, "Bad Request");
    return;
  }
  const std::string_view method = line.substr(0, sp1), target = line.substr(sp1 + 1, sp2 - sp1 - 1),
                         version = line.substr(sp2 + 1);
  if (version != "HTTP/1.0" && version != "HTTP/1.1") {
    Reject(c, MetricsReject::kBadRequest, 400, "Bad Request");
    return;
  }
  if (method != "GET") {
    Reject(c, MetricsReject::kMethod, 405, "Method Not Allowed", "Allow: GET\r\n");
    return;
  }
  if (target != "/metrics" && target.substr(0, 9) != "/metrics?") {
    Reject(c, MetricsReject::kNotFound, 404, "Not Found");
    return;
  }
  ++scrapes_;
  Answer(c, 200, "OK", Scrape());
}

std::string MetricsServer::Scrape() {
  const auto t0 = Clock::now();
  // The definitions count is refreshed off the loop, at most once a second, only when asked.
  if (opts_.count_defined && t0 - count_asked_ >= std::chrono::seconds(1)) {
    count_asked_ = t0;
    {
      std::lock_guard lk(count_mu_);
      count_wanted_ = true;
    }
    count_cv_.notify_one();
  }
  DaemonSample d;
  d.version = VGPUD_VERSION;
  d.parent = opts_.parent;
  d.start_time_unix_ms = start_time_unix_ms_;
  if (const int64_t n = defined_.load(); n >= 0) d.vgpus_defined = static_cast<uint64_t>(n);
  d.scrapes = scrapes_;
  d.rejected = rejected_;
  std::vector<VgpuSample> vgpus;
  for (const Uuid& u : pool_.List()) {
    // fresh_ms 0: the last heartbeat's counters, no ping, no wait (the loop never waits).
    auto s = pool_.Status(u, 0);
    if (s) vgpus.push_back(VgpuSample{u.ToString(), std::move(*s)});
  }
  return RenderMetrics(d, vgpus, std::chrono::duration<double>(Clock::now() - t0).count());
}

void MetricsServer::Answer(Client& c, int code, std::string_view reason, std::string body,
                           std::string_view extra_headers) {
  c.answered = true;
  c.in.clear();
  event_del(c.rev);  // one request per connection: nothing more is read
  const std::string_view type = code == 200 ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain";
  c.out = fmt::format("HTTP/1.0 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
                      code, reason, type, body.size(), extra_headers);
  c.out += body;
  c.sent = 0;
  Flush(c);
}

void MetricsServer::Flush(Client& c) {
  while (c.sent < c.out.size()) {
    const ssize_t n = ::send(c.fd.Get(), c.out.data() + c.sent, c.out.size() - c.sent, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      c.sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      event_add(c.wev, nullptr);  // the deadline bounds a client that never reads
      return;
    }
    Drop(c);  // EPIPE, ECONNRESET: the peer is gone
    return;
  }
  // All written. Half-close, then read and discard until the client closes or the deadline:
  // closing with unread input would send a reset, which can destroy the answer before the
  // client has read it. The client still counts against max_clients meanwhile.
  (void)::shutdown(c.fd.Get(), SHUT_WR);
  event_del(c.wev);
  c.lingering = true;
  if (event_add(c.rev, nullptr) != 0) Drop(c);
}

}  // namespace vg::daemon
