#pragma once
// The supervisor's Prometheus endpoint (docs/management.md "Metrics"): `GET /metrics` in the
// text exposition format 0.0.4, served on the supervisor's libevent loop.
//
// Who connects. A TCP port on loopback is open to every local user, so every byte a client
// sends is hostile, and the page itself is sensitive: per-vGPU counters show when and how
// hard each tenant works. Hence loopback by default and a remote address only on request.
//
// What a client cannot make the loop do (DESIGN.md "What a guest can never make vgpud do"):
// - wait: a scrape reads the worker pool's snapshot (the last heartbeat's counters,
//   WorkerPool::Status with fresh_ms 0) and /proc, never asks a worker, never takes the
//   mdev Manager's lock (its holder may be waiting for the loop). The one figure that needs
//   the Manager, the number of definitions, is counted on a thread of this server's own,
//   at most once a second and only while someone scrapes; a scrape shows the last count.
// - hold resources: at most max_clients connections (one more is answered 503 and closed at
//   once), max_request bytes of request line and headers, and deadline_ms from accept to the
//   last byte written, whatever the client sends or reads meanwhile.
//
// Why not evhttp: Debian 12's libevent (2.1.12) has no connection limit in evhttp
// (evhttp_set_max_connections came in 2.2), and its timeout is an idle timeout that every
// received byte restarts, so clients that trickle a byte now and then could hold any number
// of descriptors, which the supervisor needs for workers and control clients. A responder
// that only ever reads one request and writes one answer is ~200 lines and has all three
// bounds by construction.

#include <sys/socket.h>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "base/base.h"
#include "tools/vgpud/workers.h"

struct event_base;
struct event;

namespace vg::daemon {

struct MetricsLimits {
  size_t max_clients = 16;
  size_t max_request = 8 * 1024;  // request line and headers; a GET has no body
  int deadline_ms = 5000;         // accept to the last byte of the answer
};

// --metrics ADDR: PORT (on 127.0.0.1), HOST:PORT or [V6]:PORT with a numeric host or
// "localhost"; port 0 binds an ephemeral port. A host that is not loopback is refused
// (kAccessDenied) unless allow_remote.
struct MetricsEndpoint {
  sockaddr_storage addr{};
  socklen_t len = 0;
  bool loopback = true;
};
Result<MetricsEndpoint> ParseMetricsAddress(std::string_view spec, bool allow_remote);

// Why the server turned a connection away, counted in vgpud_metrics_rejected_total{reason}.
enum class MetricsReject : uint8_t { kTooManyClients, kDeadline, kTooLarge, kBadRequest, kMethod, kNotFound, kCount };

// What one scrape shows; collected on the loop thread, rendered by RenderMetrics.
struct VgpuSample {
  std::string uuid;
  WorkerStatus status;  // type, state, counters (the last heartbeat's), /proc usage
};
struct DaemonSample {
  std::string version;
  std::string parent;
  int64_t start_time_unix_ms = 0;
  std::optional<uint64_t> vgpus_defined;  // nullopt until first counted
  uint64_t scrapes = 0;                   // answered 200, this one included
  std::array<uint64_t, static_cast<size_t>(MetricsReject::kCount)> rejected{};
};

// The exposition text (format 0.0.4). Every counter of channel::kCounterNames appears, by
// its table entry: a gauge as vgpud_<name>, a counter as vgpud_<name>_total, and a counter
// named *_ns in seconds as vgpud_<name without _ns>_seconds_total.
std::string RenderMetrics(const DaemonSample& d, const std::vector<VgpuSample>& vgpus, double scrape_seconds);
// The metric a channel counter is exported as (the rule above), and its value's text.
std::string CounterMetricName(std::string_view counter_name, bool gauge);
// Label values: backslash, double quote and newline escaped (format 0.0.4).
std::string EscapeLabelValue(std::string_view v);

class MetricsServer {
 public:
  struct Options {
    MetricsEndpoint endpoint;
    std::string parent;
    // Counts the vGPU definitions; runs on the server's own thread, may block.
    std::function<Result<uint64_t>()> count_defined;
    MetricsLimits limits;
  };
  // Binds and listens before it returns (the address is then discoverable); serves once the
  // loop runs. Call on the loop thread.
  static Result<std::unique_ptr<MetricsServer>> Create(event_base* base, WorkerPool& pool, Options opts);
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // The bound address, "127.0.0.1:PORT" or "[::1]:PORT" (the real port when 0 was asked).
  const std::string& address() const { return address_; }

 private:
  struct Client;
  MetricsServer(event_base* base, WorkerPool& pool, Options opts);
  static void OnAccept(int fd, short what, void* arg);
  static void OnAcceptBackoff(int fd, short what, void* arg);
  static void OnRead(int fd, short what, void* arg);
  static void OnWrite(int fd, short what, void* arg);
  static void OnDeadline(int fd, short what, void* arg);
  void ReadFrom(Client& c);
  void Answer(Client& c, int code, std::string_view reason, std::string body, std::string_view extra_headers = {});
  void Flush(Client& c);
  void Drop(Client& c);
  void Reject(Client& c, MetricsReject why, int code, std::string_view reason, std::string_view extra = {});
  std::string Scrape();
  void CounterMain();

  event_base* base_;
  WorkerPool& pool_;
  Options opts_;
  std::string address_;
  int64_t start_time_unix_ms_ = 0;
  UniqueFd listen_fd_;
  event* accept_ev_ = nullptr;
  event* accept_backoff_ev_ = nullptr;
  std::map<Client*, std::unique_ptr<Client>> clients_;  // loop thread
  uint64_t scrapes_ = 0;                                 // loop thread
  std::array<uint64_t, static_cast<size_t>(MetricsReject::kCount)> rejected_{};  // loop thread

  // The definitions counter thread.
  std::mutex count_mu_;
  std::condition_variable count_cv_;
  bool count_wanted_ = false;
  bool count_stop_ = false;
  std::chrono::steady_clock::time_point count_asked_{};  // loop thread
  std::atomic<int64_t> defined_{-1};                     // -1: not counted yet
  std::thread count_thread_;
};

}  // namespace vg::daemon
