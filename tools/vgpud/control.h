#pragma once
// The control socket's transport (ops: service.cc; protocol: README.md "Managing vGPUs"):
// a unix socket, 0660, owned by root (or --control-group), peers checked with SO_PEERCRED. One JSON
// request per line, one JSON reply per line, served non-blocking on the libevent loop.
// Guests never get this socket: it lives beside, not inside, what a VMM is given.

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "base/base.h"

struct event_base;
struct event;

namespace vg::daemon {

struct ControlLimits {
  size_t max_request = 64 * 1024;   // one line; longer gets kMessageTooLarge and a close
  // A peer that never reads is dropped. Bounded by the largest reply: a screenshot (F10) of a
  // 4096 x 4096 plane, PNG in base64, is at most about 90 MiB (a desktop's is far smaller).
  size_t max_pending_out = 96u << 20;
  size_t max_clients = 64;
};

class ControlServer {
 public:
  // Called on the loop thread for each complete request line; `reply` must be called
  // exactly once, on the loop thread (it is a no-op once the client is gone). One request
  // per client is in flight at a time, so replies come back in request order.
  using Reply = std::function<void(std::string line)>;
  using Handler = std::function<void(std::string request, Reply reply)>;

  // group: the gid whose members may connect besides root; nullopt: root only.
  static Result<std::unique_ptr<ControlServer>> Create(event_base* base, const std::string& path,
                                                       std::optional<gid_t> group, Handler handler,
                                                       ControlLimits limits = {});
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  const std::string& path() const { return path_; }
  uint64_t refused() const { return refused_; }

  // A one-line error reply in the protocol's shape.
  static std::string ErrorLine(Errc code, std::string_view message);

 private:
  struct Client;
  ControlServer() = default;
  static void OnAccept(int fd, short what, void* arg);
  static void OnAcceptBackoff(int fd, short what, void* arg);
  static void OnClientEvent(int fd, short what, void* arg);
  bool PeerAllowed(int fd, std::string* why) const;
  void ReadFrom(Client& c);
  void Pump(Client& c);
  void Flush(Client& c);
  void Drop(uint64_t id);

  event_base* base_ = nullptr;
  std::string path_;
  std::optional<gid_t> group_;
  Handler handler_;
  ControlLimits limits_;
  UniqueFd listen_fd_;
  event* accept_ev_ = nullptr;
  event* accept_backoff_ev_ = nullptr;  // re-arms accept_ev_ after EMFILE (AcceptConnection)
  uint64_t next_id_ = 1;
  uint64_t refused_ = 0;
  std::map<uint64_t, std::unique_ptr<Client>> clients_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace vg::daemon
