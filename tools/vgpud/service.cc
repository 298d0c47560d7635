#include "tools/vgpud/service.h"

#include "tools/vgpud/frame_png.h"

#include "abi/device.h"

#include <unistd.h>

#include <charconv>

#include <nlohmann/json.hpp>

namespace vg::daemon {
namespace {

using Json = nlohmann::ordered_json;

std::string_view StartName(mdev::StartMode m) { return m == mdev::StartMode::kAuto ? "auto" : "manual"; }

Json AttrsJson(const mdev::Attributes& attrs) {
  Json a = Json::array();
  for (const auto& [k, v] : attrs) a.push_back(Json{{k, v}});
  return a;
}

// Request fields: every accessor checks the JSON type, so a wrong type is a named error,
// never a json exception.
Result<std::optional<std::string>> OptString(const Json& req, const char* key) {
  auto it = req.find(key);
  if (it == req.end() || it->is_null()) return std::optional<std::string>{};
  VG_INVALID_IF(!it->is_string(), "'{}' must be a string", key);
  return std::optional<std::string>(it->get<std::string>());
}

Result<std::string> ReqString(const Json& req, const char* key) {
  VG_TRY_ASSIGN(std::optional<std::string> v, OptString(req, key));
  VG_INVALID_IF(!v, "'{}' is required", key);
  return std::move(*v);
}

Result<Uuid> ReqUuid(const Json& req) {
  VG_TRY_ASSIGN(std::string s, ReqString(req, "uuid"));
  return Uuid::Parse(s);
}

Result<std::optional<Uuid>> OptUuid(const Json& req) {
  VG_TRY_ASSIGN(std::optional<std::string> s, OptString(req, "uuid"));
  if (!s) return std::optional<Uuid>{};
  VG_TRY_ASSIGN(Uuid u, Uuid::Parse(*s));
  return std::optional<Uuid>(u);
}

Result<bool> OptBool(const Json& req, const char* key) {
  auto it = req.find(key);
  if (it == req.end() || it->is_null()) return false;
  VG_INVALID_IF(!it->is_boolean(), "'{}' must be true or false", key);
  return it->get<bool>();
}

// "attrs": [{"name": "value"}, ...] as mdevctl writes them.
Result<mdev::Attributes> OptAttrs(const Json& req, const char* key) {
  mdev::Attributes out;
  auto it = req.find(key);
  if (it == req.end() || it->is_null()) return out;
  VG_INVALID_IF(!it->is_array() || it->size() > 64, "'{}' must be an array of at most 64 {{\"name\": \"value\"}}", key);
  for (const Json& a : *it) {
    VG_INVALID_IF(!a.is_object() || a.size() != 1 || !a.begin().value().is_string(),
                  "'{}' entries must be one-field objects with a string value", key);
    out.emplace_back(a.begin().key(), a.begin().value().get<std::string>());
  }
  return out;
}

Json InstanceJson(const mdev::InstanceInfo& i) {
  Json j;
  j["uuid"] = i.uuid.ToString();
  j["type"] = i.type;
  j["active"] = i.active;
  j["defined"] = i.defined;
  j["start"] = i.defined ? Json(std::string(StartName(i.start))) : Json(nullptr);
  j["attrs"] = AttrsJson(i.attrs);
  j["socket"] = i.active ? Json(i.socket_path) : Json(nullptr);
  return j;
}

Json CountersJson(const std::array<uint64_t, std::tuple_size_v<decltype(channel::Record::values)>>& v) {
  Json j = Json::object();
  for (const channel::CounterName& c : channel::kCounterNames)
    j[std::string(c.name)] = v[static_cast<size_t>(c.counter)];
  // The sum `vgpuctl show` has always printed.
  j["refusals"] = v[static_cast<size_t>(channel::Counter::kMmioRefusals)] +
                  v[static_cast<size_t>(channel::Counter::kCommandRefusals)];
  return j;
}

// F7: the vGPU's fault health in words, the state and why (docs/management.md, "Fault
// health"). The numbers come from the worker's pong, which the supervisor reads as hostile:
// a state or reason it does not know is shown as "unknown", never indexed with.
Json HealthJson(const std::array<uint64_t, std::tuple_size_v<decltype(channel::Record::values)>>& v,
                const FaultThresholds& f) {
  auto at = [&](channel::Counter c) { return v[static_cast<size_t>(c)]; };
  static constexpr std::string_view kStates[] = {"ok", "throttled", "quarantined"};
  // channel::HealthReason, in order: its name, and what its faults are called in a sentence.
  static constexpr std::pair<std::string_view, std::string_view> kReasons[] = {
      {"none", ""},
      {"command_refusals", "command refusals"},
      {"mmio_refusals", "MMIO refusals"},
      {"dma_faults", "DMA faults"},
      {"remoting_errors", "remoting errors"},
      {"quarantine_lifted", ""},
  };
  const uint64_t state = at(channel::Counter::kHealth), reason = at(channel::Counter::kHealthReason);
  const uint64_t rate = at(channel::Counter::kHealthRate);
  const bool known = state < std::size(kStates) && reason < std::size(kReasons);
  Json j;
  j["state"] = state < std::size(kStates) ? kStates[state] : "unknown";
  j["reason"] = reason < std::size(kReasons) ? kReasons[reason].first : "unknown";
  j["fault_rate_per_s"] = rate;
  j["faults"] = at(channel::Counter::kFaults);
  j["throttled_ms"] = at(channel::Counter::kThrottledNs) / 1000000;
  j["quarantined_ms"] = at(channel::Counter::kQuarantinedNs) / 1000000;
  j["thresholds"] = Json{{"window_ms", f.window_ms},
                         {"throttle_per_s", f.throttle_per_s},
                         {"quarantine_per_s", f.quarantine_per_s},
                         {"throttle_rate", f.throttle_rate},
                         {"quiet_ms", f.quiet_ms}};
  const std::string slowed =
      f.throttle_rate ? fmt::format("at most {} submissions/s", f.throttle_rate) : std::string("not slowed");
  const std::string until = fmt::format("until {} ms pass without a fault", f.quiet_ms);
  std::string m;
  if (!known) {
    m = fmt::format("unknown (the worker reported state {} reason {})", state, reason);
  } else if (state == 0) {
    m = "ok";
  } else if (static_cast<channel::HealthReason>(reason) == channel::HealthReason::kQuarantineLifted) {
    m = fmt::format("{}: on probation since a reset lifted its quarantine; {} {}", kStates[state], slowed, until);
  } else if (state == 1) {
    m = fmt::format("throttled: {} faults/s over {} ms, mostly {} (threshold {}/s); {} {}", rate, f.window_ms,
                    kReasons[reason].second, f.throttle_per_s, slowed, until);
  } else {
    m = fmt::format(
        "quarantined: {} faults/s over {} ms while throttled, mostly {} (threshold {}/s); every submission is "
        "refused with kQuarantined until the vGPU is reset",
        rate, f.window_ms, kReasons[reason].second, f.quarantine_per_s);
  }
  j["message"] = m;
  return j;
}

Json WorkerJson(const WorkerStatus& w, const WorkerPolicy& p) {
  Json ends = Json::object();
  uint64_t failures = 0;
  for (size_t k = 0; k < w.ends.size(); ++k) {
    ends[std::string(EndKindName(static_cast<EndKind>(k)))] = w.ends[k];
    failures += w.ends[k];
  }
  Json j{{"state", w.state},
         {"pid", w.pid > 0 ? Json(w.pid) : Json(nullptr)},
         {"restarts", w.restarts},
         {"failures", failures},
         {"ends", ends},
         {"last_exit", w.last_end.empty() ? Json(nullptr) : Json(w.last_end)},
         {"last_exit_unix_ms", w.last_end_unix_ms ? Json(w.last_end_unix_ms) : Json(nullptr)},
         {"heartbeat_age_ms", w.heartbeat_age_ms ? Json(*w.heartbeat_age_ms) : Json(nullptr)},
         {"start_latency_us", w.start_latency_us},
         {"restart_policy", std::string(RestartPolicyName(p.restart))},
         {"watchdog_ms", p.watchdog_ms}};
  j["limits"] = Json{{"address_space_bytes", w.address_space_limit ? Json(w.address_space_limit) : Json(nullptr)},
                     {"open_files", w.open_files_limit},
                     {"cgroup", w.cgroup.empty() ? Json(nullptr) : Json(w.cgroup)},
                     {"memory_max_bytes", w.memory_max ? Json(w.memory_max) : Json(nullptr)},
                     {"cpu_max_percent", w.cpu_percent ? Json(w.cpu_percent) : Json(nullptr)}};
  j["sandbox"] = Json{{"seccomp", w.seccomp}, {"no_new_privs", w.no_new_privs}};
  j["usage"] = Json{{"rss_bytes", w.rss_bytes}, {"fds", w.fds}, {"threads", w.threads}};
  return j;
}

}  // namespace

// ---- VgpuHost -------------------------------------------------------------------------

Result<std::string> VgpuHost::StartInstance(const Uuid& uuid, const mdev::VgpuType& type,
                                            const mdev::Attributes& attrs) {
  WorkerSpec spec;
  spec.uuid = uuid;
  spec.type = type.id;
  spec.aperture = type.aperture.v;
  spec.gtt_entries = type.gtt_entries;
  spec.sched = Effective(type, attrs);
  spec.attrs = attrs;
  spec.fixed_share_of = std::max<uint32_t>(1, type.max_instances);
  // Returns once the worker serves the vfio-user socket, which is what the Manager (and a
  // write to the tree's `create`) promises its caller.
  VG_TRY_ASSIGN(std::string path, pool_.Start(spec));
  std::lock_guard lk(mu_);
  live_[uuid] = Live{attrs, type};
  return path;
}

SchedParams VgpuHost::Effective(const mdev::VgpuType& type, const mdev::Attributes& attrs) {
  SchedParams p;
  p.weight = type.sched_weight ? type.sched_weight : 100;
  p.rate_limit = type.rate_limit;
  p.rate_burst = type.rate_burst;
  p.frame_limit = type.frame_limit;
  uint64_t gpu_ms = type.gpu_time_limit, gpu_burst_ms = type.gpu_time_burst;
  // Values were checked against their ranges when set (mdev/config.cc); a definition file
  // edited by hand is checked again here, and a bad value keeps the type's.
  for (const auto& [k, v] : attrs) {
    uint64_t n = 0;
    auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
    if (ec != std::errc() || end != v.data() + v.size()) continue;
    if (k == "sched_weight" && n >= 1 && n <= 1000) p.weight = static_cast<uint32_t>(n);
    if (k == "rate_limit" && n <= 1000000) p.rate_limit = n;
    if (k == "rate_burst" && n <= 1000000) p.rate_burst = n;
    if (k == "gpu_time_limit" && n <= 1000) gpu_ms = n;
    if (k == "gpu_time_burst" && n <= 10000) gpu_burst_ms = n;
    if (k == "frame_limit" && n <= abi::display::kFrameHz) p.frame_limit = static_cast<uint32_t>(n);
  }
  p.gpu_time_limit_ns = gpu_ms * 1'000'000;
  p.gpu_time_burst_ns = gpu_burst_ms * 1'000'000;
  return p;
}

Result<> VgpuHost::StopInstance(const Uuid& uuid) {
  VG_TRY(pool_.Stop(uuid));
  std::lock_guard lk(mu_);
  live_.erase(uuid);
  return Ok();
}

Result<> VgpuHost::SetAttribute(const Uuid& uuid, std::string_view name, std::string_view value) {
  SchedParams p;
  mdev::Attributes attrs;
  {
    std::lock_guard lk(mu_);
    auto it = live_.find(uuid);
    VG_ERROR_IF(it == live_.end(), Errc::kNotFound, "vGPU {} is not running", uuid);
    bool found = false;
    for (auto& [k, v] : it->second.attrs) {
      if (k == name) {
        v = std::string(value);
        found = true;
      }
    }
    if (!found) it->second.attrs.emplace_back(std::string(name), std::string(value));
    p = Effective(it->second.type, it->second.attrs);
    attrs = it->second.attrs;
  }
  // Weight and limits change while it runs (F7); the attributes go to its state file.
  return pool_.Reconfigure(uuid, p, std::move(attrs));
}

std::optional<VgpuHost::Live> VgpuHost::Get(const Uuid& uuid) const {
  std::lock_guard lk(mu_);
  auto it = live_.find(uuid);
  if (it == live_.end()) return std::nullopt;
  return it->second;
}

// ---- control ops ------------------------------------------------------------------------

struct ServiceOps {
  using Fn = Result<Json> (*)(Service&, const Json&);
  struct Op {
    std::string_view name;
    Fn fn;
  };

  static Result<Json> Ping(Service& s, const Json&) {
    // metrics: where `GET /metrics` is served ("HOST:PORT", the real port when --metrics
    // asked for port 0), null when not.
    return Json{{"parent", s.manager_->parent()}, {"pid", ::getpid()}, {"root", s.opts_.root.string()},
                {"tree", s.tree_ != nullptr},
                {"metrics", s.metrics_address_.empty() ? Json(nullptr) : Json(s.metrics_address_)}};
  }

  static Result<Json> Types(Service& s, const Json&) {
    Json types = Json::array();
    for (const mdev::VgpuType& t : s.manager_->types()) {
      types.push_back(Json{{"id", t.id},
                           {"name", t.name},
                           {"description", t.description},
                           {"aperture_mib", t.aperture.v >> 20},
                           {"gtt_entries", t.gtt_entries},
                           {"sched_weight", t.sched_weight},
                           {"max_instances", t.max_instances},
                           {"frame_limit", t.frame_limit},
                           {"available_instances", s.manager_->AvailableInstances(t.id)}});
    }
    return Json{{"parent", s.manager_->parent()}, {"types", types}};
  }

  static Result<Json> List(Service& s, const Json& req) {
    VG_TRY_ASSIGN(bool defined, OptBool(req, "defined"));
    Json out = Json::array();
    if (!defined) {
      for (const mdev::InstanceInfo& i : s.manager_->ListActive()) out.push_back(InstanceJson(i));
    } else {
      VG_TRY_ASSIGN(std::vector<mdev::Definition> defs, s.manager_->ListDefined());
      for (const mdev::Definition& d : defs) {
        auto shown = s.manager_->Show(d.uuid);
        if (shown) out.push_back(InstanceJson(*shown));
      }
    }
    return Json{{"parent", s.manager_->parent()}, {"instances", out}};
  }

  static Result<Json> Define(Service& s, const Json& req) {
    mdev::Definition d;
    VG_TRY_ASSIGN(std::optional<Uuid> u, OptUuid(req));
    if (u) d.uuid = *u;
    VG_TRY_ASSIGN(std::string type, ReqString(req, "type"));
    d.type = s.ResolveType(type);
    VG_TRY_ASSIGN(bool autostart, OptBool(req, "auto"));
    d.start = autostart ? mdev::StartMode::kAuto : mdev::StartMode::kManual;
    VG_TRY_ASSIGN(d.attrs, OptAttrs(req, "attrs"));
    VG_TRY_ASSIGN(Uuid made, s.manager_->Define(d));
    return Json{{"uuid", made.ToString()}};
  }

  static Result<Json> Start(Service& s, const Json& req) {
    VG_TRY_ASSIGN(std::optional<Uuid> u, OptUuid(req));
    VG_TRY_ASSIGN(std::optional<std::string> type, OptString(req, "type"));
    VG_TRY_ASSIGN(mdev::Attributes attrs, OptAttrs(req, "attrs"));
    std::string socket;
    Uuid uuid;
    if (type) {  // transient, like `mdevctl start -p P -t T [-u U]`
      uuid = u ? *u : Uuid::Random();
      VG_TRY_ASSIGN(socket, s.manager_->StartTransient(uuid, s.ResolveType(*type), attrs));
    } else {
      VG_INVALID_IF(!u, "start needs a uuid (defined instance) or a type (transient)");
      VG_INVALID_IF(!attrs.empty(), "attrs only apply to a transient start; modify the definition instead");
      uuid = *u;
      VG_TRY_ASSIGN(socket, s.manager_->Start(uuid));
    }
    return Json{{"uuid", uuid.ToString()}, {"socket", socket}};
  }

  static Result<Json> Stop(Service& s, const Json& req) {
    VG_TRY_ASSIGN(Uuid u, ReqUuid(req));
    VG_TRY(s.manager_->Stop(u));
    return Json{{"uuid", u.ToString()}};
  }

  static Result<Json> Undefine(Service& s, const Json& req) {
    VG_TRY_ASSIGN(Uuid u, ReqUuid(req));
    VG_TRY(s.manager_->Undefine(u));
    return Json{{"uuid", u.ToString()}};
  }

  // Several changes apply one after another, each validated and written atomically; the
  // first refused one stops the rest (the ones before it stay).
  static Result<Json> Modify(Service& s, const Json& req) {
    VG_TRY_ASSIGN(Uuid u, ReqUuid(req));
    VG_TRY_ASSIGN(std::optional<std::string> type, OptString(req, "type"));
    VG_TRY_ASSIGN(std::optional<std::string> start, OptString(req, "start"));
    VG_TRY_ASSIGN(mdev::Attributes add, OptAttrs(req, "addattrs"));
    std::vector<std::string> del;
    if (auto it = req.find("delattrs"); it != req.end() && !it->is_null()) {
      VG_INVALID_IF(!it->is_array() || it->size() > 64, "'delattrs' must be an array of attribute names");
      for (const Json& n : *it) {
        VG_INVALID_IF(!n.is_string(), "'delattrs' must be an array of attribute names");
        del.push_back(n.get<std::string>());
      }
    }
    VG_INVALID_IF(start && *start != "auto" && *start != "manual", "'start' must be \"auto\" or \"manual\"");
    VG_INVALID_IF(!type && !start && add.empty() && del.empty(), "modify: nothing to change");
    // `live` (mdevctl modify --live): the running instance's attributes change at once, as
    // a write to its attribute file in the mdev tree does (the scheduler's weight and
    // limits reach its worker); the definition changes only with `defined` too.
    const bool live = req.value("live", false), defined = !live || req.value("defined", false);
    if (live) {
      VG_INVALID_IF(type || start || !del.empty(),
                    "modify --live changes attributes only (--addattr); the type, start mode and removals apply "
                    "to the definition");
      VG_TRY_ASSIGN(mdev::InstanceInfo running, s.manager_->Show(u));
      VG_ERROR_IF(!running.active, Errc::kBadState, "{} is not running: modify --live needs a running vGPU", u);
      if (defined) VG_TRY(s.manager_->GetDefinition(u));  // both or neither
      for (const auto& [name, value] : add) VG_TRY(s.manager_->SetAttribute(u, name, value));
      if (!defined) {
        VG_TRY_ASSIGN(mdev::InstanceInfo i, s.manager_->Show(u));
        return InstanceJson(i);
      }
    }
    VG_TRY(s.manager_->GetDefinition(u));  // kNotFound before anything else
    if (type || start) {
      mdev::ModifyRequest r;
      if (type) r.type = s.ResolveType(*type);
      if (start) r.start = *start == "auto" ? mdev::StartMode::kAuto : mdev::StartMode::kManual;
      VG_TRY(s.manager_->Modify(u, r));
    }
    for (const std::string& name : del) {
      VG_TRY_ASSIGN(mdev::Definition d, s.manager_->GetDefinition(u));
      std::optional<uint32_t> index;
      for (size_t i = 0; i < d.attrs.size(); ++i)
        if (d.attrs[i].first == name) index = static_cast<uint32_t>(i);
      VG_ERROR_IF(!index, Errc::kNotFound, "{} has no attribute '{}'", u, name);
      mdev::ModifyRequest r;
      r.del_attr = true;
      r.index = index;
      VG_TRY(s.manager_->Modify(u, r));
    }
    for (const auto& kv : add) {
      mdev::ModifyRequest r;
      r.add_attr = kv;
      VG_TRY(s.manager_->Modify(u, r));
    }
    VG_TRY_ASSIGN(mdev::InstanceInfo i, s.manager_->Show(u));
    return InstanceJson(i);
  }

  static Result<Json> Show(Service& s, const Json& req) {
    VG_TRY_ASSIGN(Uuid u, ReqUuid(req));
    VG_TRY_ASSIGN(mdev::InstanceInfo i, s.manager_->Show(u));
    Json j = InstanceJson(i);
    j["parent"] = s.manager_->parent();
    j["state"] = i.active ? "running" : "stopped";
    if (auto t = s.manager_->FindType(i.type)) {
      j["aperture_mib"] = t->aperture.v >> 20;
      j["gtt_entries"] = t->gtt_entries;
      j["sched_weight"] = t->sched_weight;
    }
    // Effective values; a definition file is mdevctl's too, so its values are checked again.
    for (const auto& [k, v] : i.attrs) {
      uint64_t n = 0;
      auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
      if ((k == "sched_weight" || k == "rate_limit" || k == "frame_limit") && ec == std::errc() && p == v.data() + v.size()) j[k] = n;
    }
    if (i.active) {
      j["remoting_socket"] = s.sup_.workers().RemotingSocketPath(u);
      // Counters of now: the worker answers a ping within 250 ms or the last heartbeat's are shown.
      if (auto w = s.sup_.workers().Status(u, 250)) {
        j["worker"] = WorkerJson(*w, s.sup_.workers().policy());
        // F10: the console, "ADDR:PORT" (null without one, or for a worker adopted from an
        // earlier supervisor, whose socket this one never bound).
        j["vnc"] = w->vnc.empty() ? Json() : Json(w->vnc);
        if (!w->vnc.empty()) j["vnc_password"] = !s.sup_.workers().policy().vnc_password.empty();
        if (w->counters) {
          j["counters"] = CountersJson(*w->counters);
          j["health"] = HealthJson(*w->counters, s.sup_.workers().policy().faults);
        }
        const SchedParams& sp = w->sched_params;
        Json sj{{"weight", sp.weight},
                {"rate_limit", sp.rate_limit},
                {"rate_burst", sp.rate_burst},
                {"gpu_time_limit_ms", sp.gpu_time_limit_ns / 1'000'000},
                {"gpu_time_burst_ms", sp.gpu_time_burst_ns / 1'000'000},
                {"frame_limit", sp.frame_limit},
                {"scheduling", SchedPolicyName(s.sup_.workers().policy().sched.policy)}};
        if (w->share_cap_ns) sj["share_cap_ms_per_s"] = w->share_cap_ns / 1e6;
        if (w->sched) {
          sj["state"] = SchedStateName(w->sched->state);
          sj["grants"] = w->sched->grants;
          sj["preemptions"] = w->sched->preemptions;
          sj["idle_releases"] = w->sched->idle_releases;
          sj["used_ms"] = w->sched->used_ns / 1e6;
          sj["charged_ms"] = w->sched->charged_ns / 1e6;
          sj["wait_ms"] = w->sched->wait_ns / 1e6;
          sj["vruntime_ms"] = w->sched->vruntime / 1e6;
          sj["request_ms"] = w->sched->request_ns / 1e6;
          if (w->sched->frame_ns) {  // partitioned
            sj["slot_ms"] = w->sched->slot_ns / 1e6;
            sj["frame_ms"] = w->sched->frame_ns / 1e6;
            sj["overruns"] = w->sched->overruns;
            sj["overrun_ms"] = w->sched->overrun_ns / 1e6;
          }
        }
        j["scheduler"] = std::move(sj);
        j["sched_weight"] = sp.weight;  // effective
        j["rate_limit"] = sp.rate_limit;
        j["frame_limit"] = sp.frame_limit;
        if (w->state != "running") j["state"] = w->state;  // starting, restarting, failed
      }
    }
    return j;
  }

  // Test builds' workers act on it (docs/isolation.md); a production worker logs and ignores it.
  static Result<Json> Fault(Service& s, const Json& req) {
    VG_TRY_ASSIGN(Uuid u, ReqUuid(req));
    VG_TRY_ASSIGN(std::string name, ReqString(req, "fault"));
    static constexpr std::pair<std::string_view, channel::Fault> kFaults[] = {
        {"syscall", channel::Fault::kForbiddenSyscall},
        {"hang", channel::Fault::kHangLoop},
        {"crash", channel::Fault::kCrash},
        {"memory", channel::Fault::kExhaustMemory},
        {"device-lost", channel::Fault::kDeviceLost},
        {"flood", channel::Fault::kFloodChannel},
    };
    for (const auto& [n, f] : kFaults) {
      if (n != name) continue;
      VG_TRY(s.sup_.workers().Fault(u, f));
      return Json{{"uuid", u.ToString()}, {"fault", name}};
    }
    return MakeError(Errc::kInvalidArgument, "fault '{}': syscall, hang, crash, memory, device-lost or flood", name.substr(0, 32));
  }

  // F8: the host resets a running vGPU's device model (docs/management.md "Reset").
  static Result<Json> Reset(Service& s, const Json& req) {
    VG_TRY_ASSIGN(Uuid u, ReqUuid(req));
    VG_TRY(s.sup_.workers().Reset(u));
    return Json{{"uuid", u.ToString()}};
  }

  // F10: the frame the vGPU scans out, as a PNG in base64 (docs/management.md "Display").
  // Waits on this control thread, at most 2 s, for the worker; never on the loop.
  static Result<Json> Screenshot(Service& s, const Json& req) {
    VG_TRY_ASSIGN(Uuid u, ReqUuid(req));
    VG_TRY_ASSIGN(ScanoutImage img, s.sup_.workers().Screenshot(u, 2000));
    VG_TRY_ASSIGN(std::string png, EncodePng(img));
    return Json{{"uuid", u.ToString()}, {"width", img.width},  {"height", img.height},
                {"format", img.format},  {"flips", img.flips}, {"png_base64", Base64(png)}};
  }

  static constexpr Op kOps[] = {
      {"ping", &Ping},     {"types", &Types},   {"list", &List},         {"define", &Define}, {"start", &Start},
      {"stop", &Stop},     {"undefine", &Undefine}, {"modify", &Modify}, {"show", &Show},
      {"fault", &Fault},   {"reset", &Reset},   {"screenshot", &Screenshot},
  };
};

std::string Service::Handle(std::string_view request) {
  auto fail = [](const Error& e) { return std::string(ControlServer::ErrorLine(e.code, e.what)); };
  Json req = Json::parse(request.begin(), request.end(), nullptr, /*allow_exceptions=*/false);
  if (req.is_discarded() || !req.is_object()) return fail({Errc::kBadMessage, "request is not a JSON object"});
  auto op = req.find("op");
  if (op == req.end() || !op->is_string()) return fail({Errc::kBadMessage, "request has no \"op\" string"});
  const std::string name = op->get<std::string>();
  for (const ServiceOps::Op& o : ServiceOps::kOps) {
    if (o.name != name) continue;
    Result<Json> r = MakeError(Errc::kInternal, "op failed");
    try {
      r = o.fn(*this, req);
    } catch (const std::exception& e) {  // a bug, not a crash: the worker must outlive it
      r = MakeError(Errc::kInternal, "op {}: {}", name, e.what());
    }
    if (!r) {
      VG_LOGI("control: {} refused: {}", name, r.error().ToString());
      return fail(r.error());
    }
    Json reply;
    reply["ok"] = true;
    for (auto& [k, v] : r->items()) reply[k] = v;
    return reply.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  }
  return fail({Errc::kUnknownCommand, fmt::format("unknown op '{}'", name.substr(0, 64))});
}

// ---- lifecycle ----------------------------------------------------------------------------

Result<std::unique_ptr<Service>> Service::Create(Supervisor& sup, ServiceOptions opts) {
  std::unique_ptr<Service> s(new Service(sup, std::move(opts)));
  s->host_ = std::make_unique<VgpuHost>(sup.workers());
  mdev::Config cfg;
  cfg.root = s->opts_.root;
  cfg.types_file = s->opts_.types_file;
  cfg.parent = s->opts_.parent;
  cfg.aperture_budget = s->opts_.aperture_budget;
  VG_TRY_ASSIGN(s->manager_, mdev::Manager::Create(cfg, *s->host_));
  VG_LOGI("mdev: parent {}, definitions in {}", s->manager_->parent(), s->manager_->definitions_dir().string());
  return s;
}

Service::~Service() { Shutdown(); }

std::string Service::ResolveType(std::string_view name) const {
  if (manager_->FindType(name)) return std::string(name);
  std::string prefixed = "vgpud-" + std::string(name);
  if (manager_->FindType(prefixed)) return prefixed;
  return std::string(name);  // unknown either way: the Manager names it in its error
}

std::vector<Error> Service::StartAutoInstances() { return manager_->StartAutoInstances(); }

std::vector<Error> Service::RestoreRunning() {
  std::vector<Error> failures;
  WorkerPool& pool = sup_.workers();
  for (const WorkerSpec& s : pool.Adoptable()) {
    // Through the Manager, as any start: it charges the budget and lists the instance; the
    // pool's Start adopts the live worker instead of spawning one. A defined vGPU comes back
    // from its definition, a transient one as it ran.
    const bool defined = manager_->GetDefinition(s.uuid).ok();
    auto r = defined ? manager_->Start(s.uuid) : manager_->StartTransient(s.uuid, s.type, s.attrs);
    if (!r) {
      VG_LOGW("restore of {}: {}", s.uuid, r.error().ToString());
      failures.push_back(std::move(r).error());
    }
  }
  pool.DropAdoptable();
  return failures;
}

Result<std::string> Service::StartFromSpec(std::string_view spec) {
  const size_t colon = spec.find(':');
  VG_TRY_ASSIGN(Uuid u, Uuid::Parse(spec.substr(0, colon)));
  const std::string type = colon == std::string_view::npos ? "vgpud-small" : ResolveType(spec.substr(colon + 1));
  // Restored from an earlier supervisor (RestoreRunning) already: the same instance.
  if (auto i = manager_->Show(u); i && i->active && i->type == type) return i->socket_path;
  return manager_->StartTransient(u, type, {});
}

Result<> Service::Open() {
  VG_TRY_ASSIGN(control_, ControlServer::Create(sup_.base(), opts_.control_path, opts_.control_group,
                                                [this](std::string req, ControlServer::Reply reply) {
                                                  Submit(std::move(req), std::move(reply));
                                                }));
  VG_LOGI("control socket {} (0660{})", opts_.control_path,
          opts_.control_group ? fmt::format(", group {}", *opts_.control_group) : std::string());
  if (opts_.mount_tree) {
    auto tree = mdev::MdevTree::Mount(*manager_, opts_.root / "sys");
    if (!tree) {
      Error e = std::move(tree).error();
      e.what = fmt::format("mdev tree at {} (--no-mdev-tree runs without it): {}", (opts_.root / "sys").string(), e.what);
      return e;
    }
    tree_ = std::move(tree).value();
    VG_LOGI("mdev tree at {}", tree_->mountpoint().string());
  }
  // Last: the worker reads tree_ (ping), and nothing reaches it before the loop runs anyway.
  for (int i = 0; i < kManagementThreads; ++i) workers_.emplace_back([this] { WorkerMain(); });
  return Ok();
}

void Service::Submit(std::string request, ControlServer::Reply reply) {
  std::lock_guard lk(wmu_);
  if (wstop_) return;
  jobs_.emplace_back(std::move(request), std::move(reply));
  wcv_.notify_one();
}

void Service::WorkerMain() {
  for (;;) {
    std::pair<std::string, ControlServer::Reply> job;
    {
      std::unique_lock lk(wmu_);
      wcv_.wait(lk, [this] { return wstop_ || !jobs_.empty(); });
      if (wstop_) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    std::string reply = Handle(job.first);
    // Replies go back through the loop, which owns the control connections.
    sup_.loop().Post([r = std::move(job.second), reply = std::move(reply)]() mutable { r(std::move(reply)); });
  }
}

void Service::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  // 1. The loop has exited: fail whatever waits for it (a worker or FUSE request mid-start).
  sup_.loop().Stop();
  // 2. No more control requests.
  {
    std::lock_guard lk(wmu_);
    wstop_ = true;
    jobs_.clear();
  }
  wcv_.notify_all();
  for (std::thread& t : workers_) t.join();
  workers_.clear();
  // 3. No more mdevctl requests: unmount before stopping what the tree shows.
  tree_.reset();
  // 4. Every vGPU down (on this thread, the loop's, now that nothing else calls in).
  manager_->StopAll();
  control_.reset();
}

}  // namespace vg::daemon
