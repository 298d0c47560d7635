#include "tools/vgpud/control.h"

#include <event2/event.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include <nlohmann/json.hpp>

namespace vg::daemon {

struct ControlServer::Client {
  uint64_t id = 0;
  UniqueFd fd;
  event* rev = nullptr;
  event* wev = nullptr;
  uid_t uid = 0;
  std::string in;
  std::string out;
  size_t out_sent = 0;  // bytes of `out` already sent: a megabyte reply is not shifted per send
  bool busy = false;      // a request is with the handler
  bool in_pump = false;   // the handler answered inline: Pump's own loop goes on
  bool peer_eof = false;  // peer shut down its write side: answer what it sent, then close
  bool closing = false;   // close once `out` is flushed
  ~Client() {
    if (rev) event_free(rev);
    if (wev) event_free(wev);
  }
};

namespace {

bool BindAddress(const std::string& path, sockaddr_un* a) {
  *a = {};
  a->sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(a->sun_path)) return false;
  std::memcpy(a->sun_path, path.c_str(), path.size() + 1);
  return true;
}

void SendBestEffort(int fd, const std::string& line) {
  (void)::send(fd, line.data(), line.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
}

}  // namespace

std::string ControlServer::ErrorLine(Errc code, std::string_view message) {
  nlohmann::ordered_json j;
  j["ok"] = false;
  j["error"] = std::string(ErrcName(code));
  j["message"] = std::string(message);
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

Result<std::unique_ptr<ControlServer>> ControlServer::Create(event_base* base, const std::string& path,
                                                             std::optional<gid_t> group, Handler handler,
                                                             ControlLimits limits) {
  sockaddr_un addr;
  VG_INVALID_IF(!BindAddress(path, &addr), "control socket path '{}' is empty or too long", path);
  std::unique_ptr<ControlServer> s(new ControlServer());
  s->base_ = base;
  s->path_ = path;
  s->group_ = group;
  s->handler_ = std::move(handler);
  s->limits_ = limits;

  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    VG_ERROR_IF(!S_ISSOCK(st.st_mode), Errc::kAlreadyExists, "{} exists and is not a socket", path);
    // A socket someone still answers on belongs to a running daemon; a dead one is stale.
    UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    VG_ERROR_IF(::connect(probe.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0, Errc::kAlreadyExists,
                "another vgpud answers on {}", path);
    ::unlink(path.c_str());
  }
  s->listen_fd_ = UniqueFd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  VG_ERROR_IF(!s->listen_fd_.Valid(), Errc::kIo, "socket: {}", std::strerror(errno));
  // The socket file must never exist with wider permissions than 0660, not even between
  // bind() and chmod(): bind under a umask that leaves at most 0600, then widen to the group.
  const mode_t old_mask = ::umask(0177);
  const int br = ::bind(s->listen_fd_.Get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  const int bind_errno = errno;
  ::umask(old_mask);
  VG_ERROR_IF(br != 0, Errc::kIo, "bind {}: {}", path, std::strerror(bind_errno));
  if (::chown(path.c_str(), ::geteuid(), group.value_or(::getegid())) != 0 || ::chmod(path.c_str(), 0660) != 0) {
    const int e = errno;
    ::unlink(path.c_str());
    return MakeError(Errc::kIo, "chown/chmod {}: {}", path, std::strerror(e));
  }
  if (::listen(s->listen_fd_.Get(), 16) != 0) {
    const int e = errno;
    ::unlink(path.c_str());
    return MakeError(Errc::kIo, "listen {}: {}", path, std::strerror(e));
  }
  s->accept_ev_ = event_new(base, s->listen_fd_.Get(), EV_READ | EV_PERSIST, &ControlServer::OnAccept, s.get());
  s->accept_backoff_ev_ = evtimer_new(base, &ControlServer::OnAcceptBackoff, s.get());
  VG_ERROR_IF(!s->accept_ev_ || !s->accept_backoff_ev_ || event_add(s->accept_ev_, nullptr) != 0, Errc::kInternal,
              "control accept event");
  return s;
}

ControlServer::~ControlServer() {
  *alive_ = false;
  clients_.clear();
  if (accept_ev_) event_free(accept_ev_);
  if (accept_backoff_ev_) event_free(accept_backoff_ev_);
  if (!path_.empty()) ::unlink(path_.c_str());
}

bool ControlServer::PeerAllowed(int fd, std::string* why) const {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    *why = fmt::format("SO_PEERCRED: {}", std::strerror(errno));
    return false;
  }
  if (cred.uid == 0 || cred.uid == ::geteuid()) return true;
  if (group_) {
    if (cred.gid == *group_) return true;
    // Supplementary groups, as the kernel saw them at connect() (Linux >= 4.13), all of
    // them: a user may be in up to NGROUPS_MAX (65536). ERANGE reports the size needed.
    std::vector<gid_t> groups(64);
    for (int tries = 0; tries < 3; ++tries) {
      socklen_t glen = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
      if (::getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &glen) == 0) {
        groups.resize(glen / sizeof(gid_t));
        if (std::find(groups.begin(), groups.end(), *group_) != groups.end()) return true;
        break;
      }
      if (errno != ERANGE) break;
      groups.resize(glen / sizeof(gid_t) + 1);
    }
    *why = fmt::format("uid {} (pid {}) is neither root nor in group {}", cred.uid, cred.pid, *group_);
  } else {
    *why = fmt::format("uid {} (pid {}) is not root", cred.uid, cred.pid);
  }
  return false;
}

void ControlServer::OnAcceptBackoff(int, short, void* arg) {
  auto* self = static_cast<ControlServer*>(arg);
  event_add(self->accept_ev_, nullptr);
}

void ControlServer::OnAccept(int lfd, short, void* arg) {
  auto* self = static_cast<ControlServer*>(arg);
  for (;;) {
    auto accepted = AcceptConnection(lfd);
    if (!accepted.ok()) {
      if (accepted.code() == Errc::kLimitExceeded) {
        // Out of fds: a level-triggered listener left armed would spin the loop.
        event_del(self->accept_ev_);
        timeval tv{0, kAcceptBackoffMs * 1000};
        evtimer_add(self->accept_backoff_ev_, &tv);
      }
      if (accepted.code() != Errc::kBusy) VG_LOGW("control: {}", accepted.error().what);
      return;
    }
    UniqueFd fd = std::move(accepted).value();
    std::string why;
    if (!self->PeerAllowed(fd.Get(), &why)) {
      ++self->refused_;
      VG_LOGW("control: refused a peer: {}", why);
      SendBestEffort(fd.Get(), ErrorLine(Errc::kAccessDenied, why));
      continue;
    }
    if (self->clients_.size() >= self->limits_.max_clients) {
      ++self->refused_;
      SendBestEffort(fd.Get(), ErrorLine(Errc::kLimitExceeded, "too many control clients"));
      continue;
    }
    auto c = std::make_unique<Client>();
    c->id = self->next_id_++;
    const int cfd = fd.Get();
    c->fd = std::move(fd);
    // Callbacks find their client by fd in clients_: a late event for a dropped client finds none.
    c->rev = event_new(self->base_, cfd, EV_READ | EV_PERSIST, &ControlServer::OnClientEvent, self);
    c->wev = event_new(self->base_, cfd, EV_WRITE | EV_PERSIST, &ControlServer::OnClientEvent, self);
    if (!c->rev || !c->wev) continue;
    event_add(c->rev, nullptr);
    self->clients_.emplace(c->id, std::move(c));
  }
}

void ControlServer::OnClientEvent(int fd, short what, void* arg) {
  auto* self = static_cast<ControlServer*>(arg);
  Client* c = nullptr;
  for (auto& [id, cl] : self->clients_)
    if (cl->fd.Get() == fd) c = cl.get();
  if (!c) return;
  if (what & EV_WRITE) {
    self->Flush(*c);
    return;  // Flush may have dropped the client
  }
  if (what & EV_READ) self->ReadFrom(*c);
}

void ControlServer::ReadFrom(Client& c) {
  char buf[16 * 1024];
  for (;;) {
    ssize_t n = ::read(c.fd.Get(), buf, sizeof(buf));
    if (n > 0) {
      c.in.append(buf, static_cast<size_t>(n));
      // Pipelined requests wait while one is in flight; do not buffer without bound.
      if (c.in.size() > 4 * limits_.max_request) break;
      continue;
    }
    if (n == 0) {
      c.peer_eof = true;
      event_del(c.rev);
      break;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) break;
    Drop(c.id);
    return;
  }
  Pump(c);
}

// Hands the next complete line to the handler, or finishes the client.
void ControlServer::Pump(Client& c) {
  const uint64_t id = c.id;
  c.in_pump = true;
  while (!c.busy && !c.closing) {
    const size_t nl = c.in.find('\n');
    if (nl == std::string::npos) {
      if (c.in.size() > limits_.max_request) {
        VG_LOGW("control: request over {} bytes without a newline; closing the client", limits_.max_request);
        c.in.clear();
        c.out += ErrorLine(Errc::kMessageTooLarge, fmt::format("request longer than {} bytes", limits_.max_request));
        c.closing = true;
      }
      break;
    }
    std::string line = c.in.substr(0, nl);
    c.in.erase(0, nl + 1);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    if (line.size() > limits_.max_request) {
      c.out += ErrorLine(Errc::kMessageTooLarge, fmt::format("request longer than {} bytes", limits_.max_request));
      c.closing = true;
      break;
    }
    c.busy = true;
    handler_(std::move(line), [alive = std::weak_ptr<bool>(alive_), self = this, id](std::string reply) {
      auto a = alive.lock();
      if (!a || !*a) return;
      auto it = self->clients_.find(id);
      if (it == self->clients_.end()) return;
      Client& cl = *it->second;
      cl.busy = false;
      cl.out += reply;
      if (reply.empty() || reply.back() != '\n') cl.out += '\n';
      if (cl.in_pump) return;  // answered inline: the running Pump goes on
      self->Pump(cl);
    });
  }
  c.in_pump = false;
  // A peer that can never send a complete request again is finished once answered.
  if (c.peer_eof && !c.busy && c.in.find('\n') == std::string::npos) c.closing = true;
  if (c.in.size() > 4 * limits_.max_request) c.closing = true;
  if (c.closing) event_del(c.rev);  // nothing more is read from a client being closed
  auto it = clients_.find(id);
  if (it != clients_.end()) Flush(*it->second);
}

void ControlServer::Flush(Client& c) {
  while (c.out_sent < c.out.size()) {
    ssize_t n = ::send(c.fd.Get(), c.out.data() + c.out_sent, c.out.size() - c.out_sent, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      c.out_sent += static_cast<size_t>(n);
      if (c.out_sent == c.out.size()) {
        c.out.clear();
        c.out_sent = 0;
      }
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (c.out.size() - c.out_sent > limits_.max_pending_out) {
        Drop(c.id);
        return;
      }
      event_add(c.wev, nullptr);
      return;
    }
    Drop(c.id);  // EPIPE, ECONNRESET: the peer is gone
    return;
  }
  event_del(c.wev);
  if (c.closing && !c.busy) Drop(c.id);
}

void ControlServer::Drop(uint64_t id) { clients_.erase(id); }

}  // namespace vg::daemon
