// vgpuctl: manages vgpud's vGPUs through the daemon's control socket (one JSON request per
// line, one JSON reply per line; README.md "Managing vGPUs").
//
// Exit codes: 0 ok, 1 refused by the daemon (the named error is printed), 2 usage,
// 3 cannot reach the daemon (or it broke the protocol).

#include <CLI/CLI.hpp>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "tools/vgpuctl/attach.h"

namespace {

using Json = nlohmann::ordered_json;

constexpr int kExitOk = 0;
constexpr int kExitRefused = 1;
constexpr int kExitUsage = 2;
constexpr int kExitUnreachable = 3;

struct Failure {
  int code;
  std::string message;
};

struct Options {
  std::string control;
  bool json = false;
  int timeout_s = 60;
};

// One request, one reply. A fresh connection per command keeps the CLI stateless.
std::optional<Json> Call(const Options& o, const Json& req, Failure* f) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (o.control.empty() || o.control.size() >= sizeof(a.sun_path)) {
    *f = {kExitUsage, "control socket path '" + o.control + "' is empty or too long"};
    return std::nullopt;
  }
  std::memcpy(a.sun_path, o.control.c_str(), o.control.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    *f = {kExitUnreachable, "cannot reach vgpud at " + o.control + ": " + std::strerror(errno) +
                                " (is vgpud running? --control or VGPUD_CONTROL name another socket)"};
    if (fd >= 0) ::close(fd);
    return std::nullopt;
  }
  const std::string line = req.dump() + "\n";
  size_t done = 0;
  while (done < line.size()) {
    ssize_t n = ::send(fd, line.data() + done, line.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  // A refused peer gets one error line and a close, maybe before our request was read:
  // read the answer even when the send failed.
  std::string in;
  char buf[4096];
  size_t scanned = 0;  // a screenshot's reply is megabytes: look at each byte once
  for (;;) {
    if (in.find('\n', scanned) != std::string::npos) break;
    scanned = in.size();
    pollfd p{fd, POLLIN, 0};
    int pr = ::poll(&p, 1, o.timeout_s * 1000);
    if (pr < 0 && errno == EINTR) continue;
    if (pr == 0) {
      ::close(fd);
      *f = {kExitUnreachable, "vgpud did not answer within " + std::to_string(o.timeout_s) + " s"};
      return std::nullopt;
    }
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    in.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  const size_t nl = in.find('\n');
  if (nl == std::string::npos) {
    *f = {kExitUnreachable, "vgpud closed the control connection without an answer"};
    return std::nullopt;
  }
  Json reply = Json::parse(in.substr(0, nl), nullptr, /*allow_exceptions=*/false);
  if (reply.is_discarded() || !reply.is_object() || !reply.contains("ok") || !reply["ok"].is_boolean()) {
    *f = {kExitUnreachable, "vgpud sent a malformed reply"};
    return std::nullopt;
  }
  return reply;
}

std::string Str(const Json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return "-";
  if (it->is_string()) return it->get<std::string>();
  return it->dump();
}

std::string AttrsText(const Json& attrs) {
  std::string out;
  if (!attrs.is_array()) return out;
  for (const Json& a : attrs)
    for (auto& [k, v] : a.items()) out += (out.empty() ? "" : ",") + k + "=" + (v.is_string() ? v.get<std::string>() : v.dump());
  return out.empty() ? "-" : out;
}

// "name=value" -> {"name": "value"}
std::optional<Json> ParseAttrs(const std::vector<std::string>& kvs, Failure* f) {
  Json out = Json::array();
  for (const std::string& kv : kvs) {
    const size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0) {
      *f = {kExitUsage, "attribute '" + kv + "' is not name=value"};
      return std::nullopt;
    }
    out.push_back(Json{{kv.substr(0, eq), kv.substr(eq + 1)}});
  }
  return out;
}

void PrintHuman(const std::string& cmd, const Json& r) {
  if (cmd == "status") {
    for (const char* k : {"parent", "pid", "root", "tree", "metrics"})
      std::printf("%-16s %s\n", k, Str(r, k).c_str());
  } else if (cmd == "types") {
    std::printf("parent %s\n", Str(r, "parent").c_str());
    std::printf("%-16s %9s %9s %8s %6s %4s  %s\n", "TYPE", "AVAILABLE", "APERTURE", "GTT", "WEIGHT", "MAX", "DESCRIPTION");
    for (const Json& t : r["types"])
      std::printf("%-16s %9s %6sMiB %8s %6s %4s  %s\n", Str(t, "id").c_str(), Str(t, "available_instances").c_str(),
                  Str(t, "aperture_mib").c_str(), Str(t, "gtt_entries").c_str(), Str(t, "sched_weight").c_str(),
                  Str(t, "max_instances").c_str(), Str(t, "description").c_str());
  } else if (cmd == "list") {
    for (const Json& i : r["instances"])
      std::printf("%s %s %s %s %s %s\n", Str(i, "uuid").c_str(), Str(i, "type").c_str(),
                  i.value("active", false) ? "running" : "stopped", Str(i, "start").c_str(), AttrsText(i["attrs"]).c_str(),
                  Str(i, "socket").c_str());
  } else if (cmd == "define") {
    std::printf("%s\n", Str(r, "uuid").c_str());
  } else if (cmd == "start") {
    std::printf("%s %s\n", Str(r, "uuid").c_str(), Str(r, "socket").c_str());
  } else if (cmd == "show") {
    for (const char* k : {"uuid", "parent", "type", "state", "defined", "start", "socket", "remoting_socket", "vnc",
                          "aperture_mib", "gtt_entries", "sched_weight", "rate_limit", "frame_limit"})
      if (r.contains(k)) std::printf("%-16s %s\n", k, Str(r, k).c_str());
    std::printf("%-16s %s\n", "attrs", AttrsText(r["attrs"]).c_str());
    // F7: the fault health, the state and why, as the daemon words it.
    if (r.contains("health") && r["health"].is_object())
      std::printf("%-16s %s\n", "health", Str(r["health"], "message").c_str());
    if (r.contains("counters"))
      for (auto& [k, v] : r["counters"].items()) std::printf("%-16s %s\n", k.c_str(), v.dump().c_str());
  }
}

}  // namespace

// The screenshot's PNG arrives in base64 (the control socket speaks JSON lines).
std::optional<std::string> FromBase64(const std::string& in) {
  auto val = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  if (in.size() % 4 != 0) return std::nullopt;
  std::string out;
  out.reserve(in.size() / 4 * 3);
  for (size_t i = 0; i < in.size(); i += 4) {
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = in[i + static_cast<size_t>(k)];
      if (c == '=' && i + 4 == in.size() && k >= 2) {
        v[k] = 0;
        ++pad;
        continue;
      }
      if (pad) return std::nullopt;
      v[k] = val(c);
      if (v[k] < 0) return std::nullopt;
    }
    const uint32_t w = static_cast<uint32_t>(v[0] << 18 | v[1] << 12 | v[2] << 6 | v[3]);
    out.push_back(static_cast<char>(w >> 16));
    if (pad < 2) out.push_back(static_cast<char>((w >> 8) & 0xFF));
    if (pad < 1) out.push_back(static_cast<char>(w & 0xFF));
  }
  return out;
}

int main(int argc, char** argv) {
  CLI::App app{"vgpuctl: manage vgpud's vGPUs"};
  app.require_subcommand(1);
  app.fallthrough();  // --json, --control and --timeout also after the subcommand
  Options o;
  if (const char* env = std::getenv("VGPUD_CONTROL"); env && *env) o.control = env;
  if (o.control.empty()) o.control = "/run/vgpud/control.sock";
  app.add_option("--control", o.control, "vgpud's control socket (env VGPUD_CONTROL)")->capture_default_str();
  app.add_flag("--json", o.json, "print the daemon's JSON reply");
  app.add_option("--timeout", o.timeout_s, "seconds to wait for the daemon")->check(CLI::Range(1, 3600));

  std::string uuid, type, set_type, memory = "4G";
  std::vector<std::string> attrs, addattrs, delattrs;
  bool autostart = false, manual = false, defined = false;

  auto* status = app.add_subcommand("status", "the daemon: pid, parent, mdev root and tree, metrics address");
  auto* types = app.add_subcommand("types", "vGPU types and how many instances of each are left");
  auto* list = app.add_subcommand("list", "running vGPUs (--defined: persistent definitions)");
  list->add_flag("--defined,-d", defined, "list definitions, running or not");
  auto* define = app.add_subcommand("define", "persistent definition (mdevctl format)");
  define->add_option("-u,--uuid", uuid, "UUID (default: a random one)");
  define->add_option("-t,--type", type, "type (vgpud-small or small)")->required();
  define->add_flag("--auto", autostart, "start when the daemon starts");
  define->add_option("--attr", attrs, "attribute name=value (repeatable, in order)");
  auto* start = app.add_subcommand("start", "start a defined vGPU, or a transient one with -t");
  start->add_option("uuid", uuid, "UUID of a definition (with -t: the transient vGPU's UUID)");
  start->add_option("-u,--uuid", uuid, "same as the positional UUID");
  start->add_option("-t,--type", type, "transient start of this type");
  start->add_option("--attr", attrs, "attribute name=value for a transient start (repeatable)");
  auto* stop = app.add_subcommand("stop", "stop a running vGPU (its definition stays)");
  stop->add_option("uuid", uuid, "UUID")->required();
  auto* reset = app.add_subcommand("reset", "reset a running vGPU's device (as its guest's RESET register does)");
  reset->add_option("uuid", uuid, "UUID")->required();
  std::string shot_path;
  auto* shot = app.add_subcommand("screenshot", "save the frame a running vGPU scans out as a PNG");
  shot->add_option("uuid", uuid, "UUID")->required();
  shot->add_option("file", shot_path, "the PNG to write")->required();
  auto* undefine = app.add_subcommand("undefine", "remove a definition");
  undefine->add_option("uuid", uuid, "UUID")->required();
  auto* modify = app.add_subcommand("modify", "change a definition (with --live: the running vGPU's attributes)");
  modify->add_option("uuid", uuid, "UUID")->required();
  modify->add_option("--type,-t", set_type, "new type");
  auto* auto_flag = modify->add_flag("--auto", autostart, "start when the daemon starts");
  modify->add_flag("--manual", manual, "start only when asked")->excludes(auto_flag);
  modify->add_option("--addattr", addattrs, "append attribute name=value (repeatable)");
  modify->add_option("--delattr", delattrs, "remove attribute by name (repeatable)");
  bool live = false, live_defined = false;
  modify->add_flag("--live", live, "apply --addattr to the running vGPU at once (not to the definition, unless --defined)");
  modify->add_flag("--defined", live_defined, "with --live: change the definition too");
  auto* show = app.add_subcommand("show", "state, sockets, attributes and counters of one vGPU");
  show->add_option("uuid", uuid, "UUID")->required();
  auto* qemu = app.add_subcommand("qemu-args", "QEMU options that attach a running vGPU");
  qemu->add_option("uuid", uuid, "UUID")->required();
  qemu->add_option("--memory,-m", memory, "guest RAM (shared memfd backend; QEMU size syntax)")->capture_default_str();
  auto* domxml = app.add_subcommand("domxml", "libvirt <qemu:commandline> snippet that attaches a running vGPU");
  domxml->add_option("uuid", uuid, "UUID")->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return kExitUsage;
  }

  Failure f{kExitOk, ""};
  Json req;
  std::string cmd;
  auto attrs_json = [&](const std::vector<std::string>& kvs) -> std::optional<Json> { return ParseAttrs(kvs, &f); };
  if (*status) {
    cmd = "status";
    req = {{"op", "ping"}};
  } else if (*types) {
    cmd = "types";
    req = {{"op", "types"}};
  } else if (*list) {
    cmd = "list";
    req = {{"op", "list"}, {"defined", defined}};
  } else if (*define) {
    cmd = "define";
    auto a = attrs_json(attrs);
    if (!a) goto fail;
    req = {{"op", "define"}, {"type", type}, {"auto", autostart}, {"attrs", *a}};
    if (!uuid.empty()) req["uuid"] = uuid;
  } else if (*start) {
    cmd = "start";
    auto a = attrs_json(attrs);
    if (!a) goto fail;
    if (type.empty() && uuid.empty()) {
      f = {kExitUsage, "start needs a UUID, or -t TYPE for a transient vGPU"};
      goto fail;
    }
    if (type.empty() && !attrs.empty()) {
      f = {kExitUsage, "--attr applies to a transient start (-t); use modify --addattr for a definition"};
      goto fail;
    }
    req = {{"op", "start"}};
    if (!uuid.empty()) req["uuid"] = uuid;
    if (!type.empty()) {
      req["type"] = type;
      req["attrs"] = *a;
    }
  } else if (*stop || *undefine || *show || *reset) {
    cmd = *stop ? "stop" : *undefine ? "undefine" : *reset ? "reset" : "show";
    req = {{"op", cmd}, {"uuid", uuid}};
  } else if (*modify) {
    cmd = "modify";
    auto a = attrs_json(addattrs);
    if (!a) goto fail;
    req = {{"op", "modify"}, {"uuid", uuid}};
    if (!set_type.empty()) req["type"] = set_type;
    if (autostart) req["start"] = "auto";
    if (manual) req["start"] = "manual";
    if (!a->empty()) req["addattrs"] = *a;
    if (!delattrs.empty()) req["delattrs"] = delattrs;
    if (live) req["live"] = true;
    if (live && live_defined) req["defined"] = true;
    if (req.size() == 2) {
      f = {kExitUsage, "modify: nothing to change (--type, --auto, --manual, --addattr, --delattr)"};
      goto fail;
    }
  } else if (*shot) {
    cmd = "screenshot";
    req = {{"op", cmd}, {"uuid", uuid}};
  } else if (*qemu || *domxml) {
    cmd = *qemu ? "qemu-args" : "domxml";
    req = {{"op", "show"}, {"uuid", uuid}};
  }

  {
    std::optional<Json> reply = Call(o, req, &f);
    if (!reply) goto fail;
    const Json& r = *reply;
    if (!r["ok"].get<bool>()) {
      if (o.json) std::printf("%s\n", r.dump().c_str());
      std::fprintf(stderr, "vgpuctl: %s refused: %s: %s\n", cmd.c_str(), Str(r, "error").c_str(),
                   Str(r, "message").c_str());
      return kExitRefused;
    }
    if (cmd == "screenshot") {
      std::optional<std::string> png;
      if (r.contains("png_base64") && r["png_base64"].is_string()) png = FromBase64(r["png_base64"].get<std::string>());
      if (!png) {
        f = {kExitUnreachable, "vgpud sent a screenshot without a PNG"};
        goto fail;
      }
      FILE* out = std::fopen(shot_path.c_str(), "wb");
      const bool written = out && std::fwrite(png->data(), 1, png->size(), out) == png->size();
      if (out && std::fclose(out) != 0) out = nullptr;
      if (!written || !out) {
        f = {kExitUsage, "cannot write " + shot_path + ": " + std::strerror(errno)};
        goto fail;
      }
      if (o.json) {
        Json j = r;
        j.erase("png_base64");
        j["file"] = shot_path;
        std::printf("%s\n", j.dump().c_str());
      } else {
        std::printf("%s: %sx%s, format %s, %zu bytes of PNG in %s\n", uuid.c_str(), Str(r, "width").c_str(),
                    Str(r, "height").c_str(), Str(r, "format").c_str(), png->size(), shot_path.c_str());
      }
      return kExitOk;
    }
    if (cmd == "qemu-args" || cmd == "domxml") {
      if (!r.value("active", false) || !r.contains("socket") || !r["socket"].is_string()) {
        if (o.json)
          std::printf("%s\n", Json{{"ok", false}, {"error", "kBadState"}, {"message", uuid + " is not running"}}.dump().c_str());
        std::fprintf(stderr, "vgpuctl: %s refused: kBadState: %s is not running (vgpuctl start %s)\n", cmd.c_str(),
                     uuid.c_str(), uuid.c_str());
        return kExitRefused;
      }
      vg::vgpuctl::AttachSpec s{r["uuid"].get<std::string>(), r["socket"].get<std::string>(), memory};
      if (cmd == "qemu-args") {
        auto args = vg::vgpuctl::QemuArgs(s);
        if (o.json)
          std::printf("%s\n", Json{{"ok", true}, {"uuid", s.uuid}, {"socket", s.socket}, {"args", args}}.dump().c_str());
        else
          std::printf("%s\n", vg::vgpuctl::ShellJoin(args).c_str());
      } else {
        const std::string xml = vg::vgpuctl::DomXml(s);
        if (o.json)
          std::printf("%s\n", Json{{"ok", true}, {"uuid", s.uuid}, {"socket", s.socket}, {"xml", xml}}.dump().c_str());
        else
          std::fputs(xml.c_str(), stdout);
      }
      return kExitOk;
    }
    if (o.json)
      std::printf("%s\n", r.dump().c_str());
    else
      PrintHuman(cmd, r);
    return kExitOk;
  }

fail:
  if (o.json) std::printf("%s\n", Json{{"ok", false}, {"error", f.code == kExitUsage ? "usage" : "unreachable"}, {"message", f.message}}.dump().c_str());
  std::fprintf(stderr, "vgpuctl: %s\n", f.message.c_str());
  return f.code;
}
