#pragma once
// The libevent base of the supervisor's loop and of each worker's loop: precise timers (a
// timerfd on CLOCK_MONOTONIC). Their timers are deadlines of a few hundred microseconds (the
// scheduler's preempt a quarter slice into a grant, the remoting sessions' ticks of
// coarsened time); epoll_wait's millisecond timeout rounds them up, and the supervisor's
// preempts fired 2.1 ms late at the median that way (2026-12-03; 33 us with the flag).
// Header-only: both executables link libevent, and this is their one way to make a base.

#include <event2/event.h>

#include "base/base.h"

namespace vg::daemon {

inline Result<event_base*> NewPreciseEventBase() {
  event_config* ec = event_config_new();
  VG_ERROR_IF(!ec, Errc::kInternal, "event_config_new failed");
  event_config_set_flag(ec, EVENT_BASE_FLAG_PRECISE_TIMER);
  event_base* base = event_base_new_with_config(ec);
  event_config_free(ec);
  VG_ERROR_IF(!base, Errc::kInternal, "event_base_new failed");
  return base;
}

}  // namespace vg::daemon
