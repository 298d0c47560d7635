#pragma once
// In-process remoting rig: the real engine, a libevent loop on its own thread serving an
// unbound Listener, and clients connected over SOCK_SEQPACKET socketpairs.

#include <doctest.h>
#include <event2/event.h>
#include <event2/thread.h>
#include <sys/socket.h>

#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "engine/engine.h"
#include "guest/remoting_client.h"
#include "remoting/remoting.h"

namespace vg::remoting::testing {

inline engine::Engine& TheEngine() {
  static std::unique_ptr<engine::Engine> e = [] {
    auto r = engine::Engine::Create({});
    if (!r.ok()) FAIL("no engine: " << r.error().ToString());
    return std::move(r).value();
  }();
  return *e;
}

class Rig {
 public:
  // `clients` sockets are adopted before the loop starts (the Listener is loop-owned).
  explicit Rig(int clients, Limits limits = {}, engine::Engine& engine = TheEngine()) {
    static const int once = evthread_use_pthreads();
    (void)once;
    base_ = event_base_new();
    auto l = Listener::CreateUnbound(base_, engine, limits);
    REQUIRE_MESSAGE(l.ok(), l.error().ToString());
    listener_ = std::move(l).value();
    for (int i = 0; i < clients; ++i) {
      int sv[2];
      REQUIRE(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
      REQUIRE(listener_->Adopt(UniqueFd(sv[0])).ok());
      socks_.emplace_back(sv[1]);
    }
    loop_ = std::thread([this] { event_base_loop(base_, EVLOOP_NO_EXIT_ON_EMPTY); });
  }
  ~Rig() {
    event_base_loopbreak(base_);
    loop_.join();
    listener_.reset();
    event_base_free(base_);
  }
  Rig(const Rig&) = delete;
  Rig& operator=(const Rig&) = delete;

  std::unique_ptr<guest::RemotingClient> Connect(size_t i, guest::RemotingOptions o = {}) {
    o.ring_size = o.ring_size ? o.ring_size : 64u << 10;
    o.heap_size = 1 << 20;
    auto c = guest::RemotingClient::Connect(std::move(socks_.at(i)), o);
    REQUIRE_MESSAGE(c.ok(), c.error().ToString());
    return std::move(c).value();
  }
  // Only read after the loop stopped or for monotonic counters.
  Listener& listener() { return *listener_; }

 private:
  event_base* base_ = nullptr;
  std::unique_ptr<Listener> listener_;
  std::vector<UniqueFd> socks_;
  std::thread loop_;
};

}  // namespace vg::remoting::testing
