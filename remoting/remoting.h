#pragma once
// API remoting (F4): the daemon side. A Listener per vGPU accepts remoting clients on a
// unix SOCK_SEQPACKET socket (<runtime-dir>/<uuid>.remote.sock); each client gets a
// Session that copies commands out of its shared ring, validates them and replays them on
// the shared engine. Wire format: abi/remoting.h, docs/remoting-protocol.md.

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "abi/device.h"
#include "base/base.h"

struct event_base;

namespace vg::engine {
class Engine;
}

namespace vg::remoting {

// Per-client caps.
struct Limits {
  uint32_t max_objects = 4096;          // live buffers
  uint64_t max_bytes = 512ull << 20;    // sum of live buffer sizes
  uint64_t max_buffer = 256ull << 20;   // one buffer
  uint32_t max_clients = 16;            // per listener, handshaken clients only
  // Connections that have not finished the handshake (they hold an fd and a slot, and
  // never count toward max_clients): each has this long to send its Hello, and at most
  // this many wait at once (the oldest is refused to make room for a newcomer).
  uint32_t handshake_timeout_ms = 2000;
  uint32_t max_pending_handshakes = 8;
  // Not a cap: the host's time granularity G (vgpud --time-granularity-us). A client learns
  // that its GPU work completed (and the answers that wait for it: FENCE, READ, ring space)
  // only at multiples of G of CLOCK_MONOTONIC after it did, so it cannot time its
  // neighbours' load through the shared engine (docs/remoting-protocol.md). 0: off. The
  // loop never waits for a tick: a timer brings the session back.
  uint64_t time_granularity_ns = abi::cmd::kDefaultTimeGranularityNs;
};

struct ListenerStats {
  uint64_t accepted = 0;
  uint64_t refused = 0;          // failed handshakes
  uint64_t dropped = 0;          // clients dropped for a corrupt ring
  uint64_t commands = 0;         // executed
  uint64_t errors = 0;           // refused commands
  uint64_t submissions = 0;      // engine submissions
  uint64_t wakes = 0;            // wake eventfd events
};

// F7: the vGPU's fault monitor as the remoting server sees it (the worker adapts the one
// its device model owns, so both paths count toward one health; docs/management.md, "Fault
// health"). Called on the loop.
class FaultGate {
 public:
  struct Admission {
    Errc code = Errc::kOk;              // kQuarantined: refuse the command
    std::chrono::nanoseconds wait{0};   // throttled: run it after this long, not now
  };
  virtual ~FaultGate() = default;
  // Before each command (a command continued over several turns asks once).
  virtual Admission Admit() = 0;
  // A refused command, a failed submission, a dropped client, a malformed handshake.
  virtual void OnFault() = 0;
};

class Listener {
 public:
  // Binds and listens on `path` (an existing file there is replaced).
  static Result<std::unique_ptr<Listener>> Create(event_base* base, engine::Engine& engine, std::string path,
                                                  Limits limits = {});
  // Accepts on a SOCK_SEQPACKET socket that already listens and whose path someone else owns
  // (a vgpud worker serves the socket its supervisor bound); `name` is for the log only.
  static Result<std::unique_ptr<Listener>> CreateOnSocket(event_base* base, engine::Engine& engine, UniqueFd listening,
                                                          std::string name, Limits limits = {});
  // Serves over an already-connected SOCK_SEQPACKET socket (tests: a socketpair), with no
  // listening socket (path empty).
  static Result<std::unique_ptr<Listener>> CreateUnbound(event_base* base, engine::Engine& engine,
                                                         Limits limits = {});
  // Adopts a connected socket; the handshake runs on the loop.
  virtual Result<> Adopt(UniqueFd sock) = 0;
  virtual ~Listener() = default;  // drops every client, unlinks the socket

  // Null (the default): no fault monitor. The gate must outlive the listener.
  virtual void SetFaultGate(FaultGate* gate) = 0;

  virtual size_t clients() const = 0;
  virtual ListenerStats stats() const = 0;
  virtual const std::string& path() const = 0;
};

}  // namespace vg::remoting
