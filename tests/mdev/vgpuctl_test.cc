// vGPU management end to end without the FUSE tree: the real vgpud, its control socket and
// the real vgpuctl binary (fork/exec), checked through --json and on disk.
#include <doctest.h>
#include <grp.h>
#include <sys/stat.h>

#include "tests/mdev/daemon_harness.h"

using namespace vg::mgmt;

namespace {

constexpr const char* kU1 = "11111111-2222-4333-8444-555555555555";
constexpr const char* kU2 = "22222222-3333-4444-8555-666666666666";
constexpr const char* kU3 = "33333333-4444-4555-8666-777777777777";

std::string AttrsOf(const Json& inst) { return inst.at("attrs").dump(); }

const Json* FindInstance(const Json& reply, const std::string& uuid) {
  if (!reply.contains("instances")) return nullptr;
  for (const Json& i : reply["instances"])
    if (i["uuid"] == uuid) return &i;
  return nullptr;
}

}  // namespace

TEST_CASE("types, define, start, list, show, modify, stop, undefine through vgpuctl --json") {
  DaemonProc d;
  REQUIRE(d.Start());

  int code = -1;
  Json types = d.CtlJson({"types"}, &code);
  CHECK(code == 0);
  REQUIRE(types["ok"] == true);
  CHECK(types["parent"] == "vgpud0");  // lavapipe has no PCI address
  REQUIRE(types["types"].size() == 3);
  CHECK(types["types"][0]["id"] == "vgpud-small");
  CHECK(types["types"][0]["available_instances"] == 16);
  CHECK(types["types"][0]["aperture_mib"] == 64);

  // define: explicit uuid, short type name, auto, two attributes in order
  Json def = d.CtlJson({"define", "-u", kU1, "-t", "small", "--auto", "--attr", "sched_weight=50", "--attr",
                        "rate_limit=100"},
                       &code);
  CHECK(code == 0);
  CHECK(def["uuid"] == kU1);
  // mdevctl's own file format, where mdevctl would look for it
  const Json file = Json::parse(ReadFile(d.runtime() / "etc/mdevctl.d/vgpud0" / kU1));
  CHECK(file["mdev_type"] == "vgpud-small");
  CHECK(file["start"] == "auto");
  CHECK(file["attrs"].dump() == R"([{"sched_weight":"50"},{"rate_limit":"100"}])");
  // define without -u picks a uuid
  Json def2 = d.CtlJson({"define", "-t", "vgpud-medium"}, &code);
  CHECK(code == 0);
  const std::string u2 = def2.value("uuid", "");
  CHECK(u2.size() == 36);

  Json defined = d.CtlJson({"list", "--defined"});
  REQUIRE(defined["instances"].size() == 2);
  REQUIRE(FindInstance(defined, kU1));
  CHECK((*FindInstance(defined, kU1))["active"] == false);
  CHECK((*FindInstance(defined, kU1))["start"] == "auto");
  CHECK(d.CtlJson({"list"})["instances"].empty());

  // start: the vfio-user socket listens when vgpuctl returns
  Json st = d.CtlJson({"start", kU1}, &code);
  CHECK(code == 0);
  CHECK(st["socket"] == d.Socket(kU1));
  CHECK(IsListening(d.Socket(kU1)));
  Json active = d.CtlJson({"list"});
  REQUIRE(active["instances"].size() == 1);
  CHECK(active["instances"][0]["uuid"] == kU1);
  CHECK(active["instances"][0]["type"] == "vgpud-small");
  CHECK(active["instances"][0]["defined"] == true);
  CHECK(AttrsOf(active["instances"][0]) == R"([{"sched_weight":"50"},{"rate_limit":"100"}])");
  CHECK(d.CtlJson({"types"})["types"][0]["available_instances"] == 15);

  // a guest drives the device; show reports its counters
  Ran guest = RunCapture({Env("VGPU_GUEST", "tools/vgpu-guest"), "--socket", d.Socket(kU1), "selftest"});
  CHECK_MESSAGE(guest.code == 0, guest.err);
  Json show = d.CtlJson({"show", kU1}, &code);
  CHECK(code == 0);
  CHECK(show["state"] == "running");
  CHECK(show["socket"] == d.Socket(kU1));
  CHECK(show["sched_weight"] == 50);  // the attribute overrides the type's 100
  CHECK(show["rate_limit"] == 100);
  REQUIRE(show.contains("counters"));
  CHECK(show["counters"]["doorbells"].get<uint64_t>() >= 1);
  CHECK(show["counters"]["resets"].get<uint64_t>() >= 1);
  CHECK(show["counters"].contains("submissions"));
  CHECK(show["counters"].contains("refusals"));
  // the human form names the same things
  Ran human = d.Ctl({"show", kU1});
  CHECK(human.code == 0);
  CHECK(human.out.find("running") != std::string::npos);
  CHECK(human.out.find(d.Socket(kU1)) != std::string::npos);
  CHECK(human.out.find("doorbells") != std::string::npos);

  // modify: the definition changes, in mdevctl's format
  Json mod = d.CtlJson({"modify", kU1, "--manual", "--delattr", "sched_weight", "--addattr", "sched_weight=7"}, &code);
  CHECK(code == 0);
  const Json file2 = Json::parse(ReadFile(d.runtime() / "etc/mdevctl.d/vgpud0" / kU1));
  CHECK(file2["start"] == "manual");
  CHECK(file2["attrs"].dump() == R"([{"rate_limit":"100"},{"sched_weight":"7"}])");
  CHECK(d.CtlJson({"modify", u2, "--type", "large", "--auto"})["ok"] == true);
  CHECK(Json::parse(ReadFile(d.runtime() / "etc/mdevctl.d/vgpud0" / u2))["mdev_type"] == "vgpud-large");
  // a bad change is refused and leaves the file as it was
  CHECK(d.Ctl({"modify", kU1, "--addattr", "sched_weight=0"}).code == 1);
  CHECK(d.Ctl({"modify", kU1, "--addattr", "bogus=1"}).code == 1);
  CHECK(d.Ctl({"modify", kU1, "--type", "huge"}).code == 1);
  CHECK(Json::parse(ReadFile(d.runtime() / "etc/mdevctl.d/vgpud0" / kU1)) == file2);

  // stop: the socket is gone when vgpuctl returns; the definition stays
  CHECK(d.CtlJson({"stop", kU1}, &code)["ok"] == true);
  CHECK(code == 0);
  CHECK(!fs::exists(d.Socket(kU1)));
  CHECK(d.CtlJson({"list"})["instances"].empty());
  CHECK(d.CtlJson({"show", kU1})["state"] == "stopped");

  // undefine
  CHECK(d.Ctl({"undefine", kU1}).code == 0);
  CHECK(!fs::exists(d.runtime() / "etc/mdevctl.d/vgpud0" / kU1));
  CHECK(d.CtlJson({"list", "--defined"})["instances"].size() == 1);
  CHECK(d.Ctl({"show", kU1}).code == 1);

  CHECK(d.Alive());
  CHECK(d.Shutdown() == 0);
}

TEST_CASE("transient starts, the large type, qemu-args and domxml") {
  DaemonProc d;
  REQUIRE(d.Start());
  int code = -1;
  Json t = d.CtlJson({"start", "-t", "small", "-u", kU2, "--attr", "rate_limit=5"}, &code);
  REQUIRE(code == 0);
  CHECK(t["uuid"] == kU2);
  CHECK(IsListening(d.Socket(kU2)));
  CHECK(d.CtlJson({"show", kU2})["defined"] == false);
  CHECK(AttrsOf(d.CtlJson({"show", kU2})) == R"([{"rate_limit":"5"}])");
  // no uuid: a random one; the 1 GiB type with its full GTT starts too
  Json r = d.CtlJson({"start", "-t", "vgpud-large"}, &code);
  CHECK_MESSAGE(code == 0, r.dump());
  const std::string ru = r.value("uuid", "");
  CHECK(IsListening(d.Socket(ru)));
  CHECK(d.CtlJson({"show", ru})["gtt_entries"] == 262144);

  Ran q = d.Ctl({"qemu-args", kU2});
  CHECK(q.code == 0);
  CHECK(q.out.find("memory-backend-memfd") != std::string::npos);
  CHECK(q.out.find("share=on") != std::string::npos);
  CHECK(q.out.find(R"('{"driver":"vfio-user-pci","id":"vgpu-22222222","socket":{"path":")" + d.Socket(kU2) +
                   R"(","type":"unix"}}')") != std::string::npos);
  Json qj = d.CtlJson({"qemu-args", kU2, "--memory", "2G"});
  REQUIRE(qj["args"].is_array());
  CHECK(qj["args"][1] == "2G");
  CHECK(Json::parse(qj["args"].back().get<std::string>())["socket"]["path"] == d.Socket(kU2));

  Ran x = d.Ctl({"domxml", kU2});
  CHECK(x.code == 0);
  CHECK(x.out.find("xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'") != std::string::npos);
  CHECK(x.out.find("<source type='memfd'/>") != std::string::npos);
  CHECK(x.out.find("<access mode='shared'/>") != std::string::npos);
  CHECK(x.out.find("<qemu:commandline>") != std::string::npos);
  CHECK(x.out.find("<qemu:arg value='-device'/>") != std::string::npos);
  CHECK(x.out.find(d.Socket(kU2)) != std::string::npos);

  // attaching needs a running vGPU
  CHECK(d.Ctl({"stop", kU2}).code == 0);
  Ran q2 = d.Ctl({"qemu-args", kU2});
  CHECK(q2.code == 1);
  CHECK(q2.err.find("kNotFound") != std::string::npos);  // transient: gone with the stop
  CHECK(d.Shutdown() == 0);
}

TEST_CASE("start: auto definitions come back after a daemon restart; --vgpu still starts transients") {
  DaemonProc d;
  d.KeepDir(true);
  const fs::path dir = d.dir();
  REQUIRE(d.Start());
  REQUIRE(d.Ctl({"define", "-u", kU1, "-t", "small", "--auto", "--attr", "sched_weight=9"}).code == 0);
  REQUIRE(d.Ctl({"define", "-u", kU2, "-t", "small"}).code == 0);  // manual: stays down
  REQUIRE(d.Ctl({"start", kU2}).code == 0);
  CHECK(d.Shutdown() == 0);
  CHECK(!fs::exists(d.Socket(kU1)));

  DaemonProc again(dir);
  REQUIRE(again.Start({"--vgpu", std::string(kU3) + ":medium"}));
  // ready means ready: auto-started and --vgpu instances listen before the control socket answers
  CHECK(IsListening(again.Socket(kU1)));
  CHECK(IsListening(again.Socket(kU3)));
  Json l = again.CtlJson({"list"});
  REQUIRE(l["instances"].size() == 2);
  REQUIRE(FindInstance(l, kU1));
  CHECK(AttrsOf(*FindInstance(l, kU1)) == R"([{"sched_weight":"9"}])");
  CHECK((*FindInstance(l, kU3))["type"] == "vgpud-medium");
  CHECK(!FindInstance(l, kU2));
  CHECK(again.Shutdown() == 0);
  std::error_code ec;
  fs::remove_all(dir, ec);
}

TEST_CASE("refusals carry the named error and exit 1; usage exits 2; no daemon exits 3") {
  DaemonProc d;
  // One instance of one small type, so "no instances left" is one start away.
  fs::create_directories(d.dir());
  std::ofstream(d.dir() / "types.json")
      << R"({"types":[{"name":"one","aperture_mib":16,"gtt_entries":4096,"sched_weight":5,"max_instances":1}]})";
  REQUIRE(d.Start({"--types", (d.dir() / "types.json").string()}));

  auto refused = [&](std::vector<std::string> args, const char* err) {
    Ran r = d.Ctl(args);
    CHECK_MESSAGE(r.code == 1, args[0], " ", r.err);
    CHECK_MESSAGE(r.err.find(err) != std::string::npos, r.err);
    args.insert(args.begin(), "--json");
    Json j = d.Ctl(args).json();
    CHECK(j["ok"] == false);
    CHECK(j["error"] == err);
    CHECK(j["message"].get<std::string>().size() > 0);
  };
  refused({"start", "-t", "small"}, "kNotFound");  // unknown type (this daemon only has vgpud-one)
  refused({"define", "-t", "nope"}, "kNotFound");
  CHECK(d.Ctl({"start", "-t", "one", "-u", kU1}).code == 0);
  refused({"start", "-t", "one"}, "kLimitExceeded");  // no instances left
  refused({"start", "-t", "one", "-u", kU1}, "kAlreadyExists");
  refused({"start", "not-a-uuid"}, "kInvalidArgument");
  refused({"stop", "12345678-1234-1234-1234-12345678"}, "kInvalidArgument");
  refused({"stop", kU2}, "kNotFound");  // unknown uuid
  refused({"show", kU2}, "kNotFound");
  refused({"undefine", kU2}, "kNotFound");
  refused({"modify", kU2, "--auto"}, "kNotFound");
  refused({"define", "-t", "one", "--attr", "sched_weight=5000"}, "kInvalidArgument");
  refused({"start", "-t", "one", "--attr", "color=blue"}, "kNotFound");  // unknown attribute

  // A definition edited by hand (mdevctl's files are plain files): shown, but not started.
  std::ofstream(d.runtime() / "etc/mdevctl.d/vgpud0" / kU3)
      << R"({"mdev_type":"vgpud-one","start":"manual","attrs":[{"sched_weight":"abc"}]})";
  Json hand = d.CtlJson({"show", kU3});
  CHECK(hand["ok"] == true);
  CHECK(hand["sched_weight"] == 5);  // the type's weight: "abc" overrides nothing
  refused({"start", kU3}, "kInvalidArgument");
  std::ofstream(d.runtime() / "etc/mdevctl.d/vgpud0" / kU3) << "{ not json";
  refused({"show", kU3}, "kInvalidArgument");
  CHECK(d.CtlJson({"list", "--defined"})["ok"] == true);  // skipped, not fatal
  CHECK(d.Ctl({"list", "--json"}).json()["ok"] == true);  // global options after the subcommand too
  CHECK(d.Ctl({}).code == 2);
  CHECK(d.Ctl({"frobnicate"}).code == 2);
  CHECK(d.Ctl({"define"}).code == 2);                            // -t is required
  CHECK(d.Ctl({"define", "-t", "one", "--attr", "x"}).code == 2);  // not name=value
  CHECK(d.Ctl({"modify", kU1}).code == 2);                       // nothing to change
  CHECK(d.Ctl({"modify", kU1, "--auto", "--manual"}).code == 2);
  CHECK(d.Ctl({"start"}).code == 2);

  Ran gone = RunCapture({Env("VGPUCTL", "tools/vgpuctl"), "--control", (d.dir() / "nothing.sock").string(), "list"});
  CHECK(gone.code == 3);
  CHECK(gone.err.find("cannot reach vgpud") != std::string::npos);
  setenv("VGPUD_CONTROL", d.control().c_str(), 1);  // the env default is honoured
  CHECK(RunCapture({Env("VGPUCTL", "tools/vgpuctl"), "list"}).code == 0);
  unsetenv("VGPUD_CONTROL");
  CHECK(d.Alive());
  CHECK(d.Shutdown() == 0);
}

TEST_CASE("control socket: 0660, peer credentials checked, other users refused") {
  DaemonProc d;
  REQUIRE(d.Start());
  // Let an unprivileged user reach the socket's directory, so only the socket decides.
  fs::permissions(d.dir(), fs::perms(0755));
  struct stat st {};
  REQUIRE(stat(d.control().c_str(), &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  CHECK((st.st_mode & 0777) == 0660);
  CHECK(st.st_uid == 0);
  CHECK(st.st_gid == 0);

  // Runs `probe` as nobody:nogroup in a child; returns its exit code.
  auto as_nobody = [](const std::function<int()>& probe) {
    pid_t pid = fork();
    if (pid == 0) {
      gid_t g = 65534;
      if (setgroups(1, &g) != 0 || setgid(65534) != 0 || setuid(65534) != 0) _exit(100);
      _exit(probe());
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 200;
  };
  const std::string path = d.control();
  // The file mode keeps nobody out...
  CHECK(as_nobody([&] { return ConnectUnix(path) < 0 && errno == EACCES ? 0 : 1; }) == 0);
  // ...and so does the daemon's own check, should the mode ever be widened.
  REQUIRE(chmod(path.c_str(), 0666) == 0);
  CHECK(as_nobody([&] {
          int fd = ConnectUnix(path);
          if (fd < 0) return 2;
          SendAll(fd, "{\"op\":\"list\"}\n");
          std::string r = ReadLines(fd, 1);
          // one refusal line, then the daemon closes the connection
          bool closed = ReadLines(fd, 1, 2000) == "";
          return r.find("\"error\":\"kAccessDenied\"") != std::string::npos && closed ? 0 : 3;
        }) == 0);
  // vgpuctl as nobody says why, with exit 1
  Ran r = d.Ctl({"list"}, [] {
    gid_t g = 65534;
    if (setgroups(1, &g) != 0 || setgid(65534) != 0 || setuid(65534) != 0) _exit(100);
  });
  CHECK(r.code == 1);
  CHECK(r.err.find("kAccessDenied") != std::string::npos);
  CHECK(d.Alive());
  CHECK(d.Ctl({"list"}).code == 0);  // root still is
  CHECK(d.Shutdown() == 0);

  // --control-group: the group's members get in, with the socket owned by that group.
  DaemonProc g;
  REQUIRE(g.Start({"--control-group", "nogroup"}));
  fs::permissions(g.dir(), fs::perms(0755));
  REQUIRE(stat(g.control().c_str(), &st) == 0);
  CHECK(st.st_gid == 65534);
  CHECK((st.st_mode & 0777) == 0660);
  const std::string gpath = g.control();
  CHECK(as_nobody([&] {
          int fd = ConnectUnix(gpath);
          if (fd < 0) return 2;
          SendAll(fd, "{\"op\":\"types\"}\n");
          return ReadLines(fd, 1).find("\"ok\":true") != std::string::npos ? 0 : 3;
        }) == 0);
  CHECK(g.Shutdown() == 0);
}

TEST_CASE("control socket: a member of the control group through its 65th+ supplementary group gets in") {
  if (geteuid() != 0) {
    MESSAGE("skipped: setting 100 supplementary groups needs root");
    return;
  }
  DaemonProc g;
  REQUIRE(g.Start({"--control-group", "nogroup"}));
  fs::permissions(g.dir(), fs::perms(0755));
  const std::string path = g.control();
  pid_t pid = fork();
  if (pid == 0) {
    // 100 groups, the control group (65534) sorted last: past the first 64.
    std::vector<gid_t> groups;
    for (gid_t i = 0; i < 99; ++i) groups.push_back(40000 + i);
    groups.push_back(65534);
    if (setgroups(groups.size(), groups.data()) != 0 || setgid(40500) != 0 || setuid(40501) != 0) _exit(100);
    int fd = ConnectUnix(path);
    if (fd < 0) _exit(2);
    SendAll(fd, "{\"op\":\"types\"}\n");
    _exit(ReadLines(fd, 1).find("\"ok\":true") != std::string::npos ? 0 : 3);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  CHECK_MESSAGE((WIFEXITED(status) && WEXITSTATUS(status) == 0), "child exit " << WEXITSTATUS(status));
  CHECK(g.Shutdown() == 0);
}

TEST_CASE("malformed, oversized and pipelined control requests: error replies, the daemon lives") {
  DaemonProc d;
  REQUIRE(d.Start());
  int fd = ConnectUnix(d.control());
  REQUIRE(fd >= 0);
  // Several requests in one write, answered in order, one line each.
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"not json at all", "kBadMessage"},
      {"[1,2,3]", "kBadMessage"},
      {"{\"uuid\":\"x\"}", "kBadMessage"},
      {"{\"op\":42}", "kBadMessage"},
      {"{\"op\":\"reboot\"}", "kUnknownCommand"},
      {"{\"op\":\"start\",\"uuid\":5}", "kInvalidArgument"},
      {"{\"op\":\"start\",\"type\":[\"small\"]}", "kInvalidArgument"},
      {"{\"op\":\"define\",\"type\":\"small\",\"attrs\":{\"a\":1}}", "kInvalidArgument"},
      {"{\"op\":\"list\",\"defined\":\"yes\"}", "kInvalidArgument"},
      {"{\"op\":\"modify\",\"uuid\":\"11111111-2222-4333-8444-555555555555\",\"delattrs\":[1]}", "kInvalidArgument"},
      {"{\"op\":\"start\",\"uuid\":\"\\u0000\\ud800\"}", "kBadMessage"},  // lone surrogate: not JSON
      {"{\"op\":\"start\",\"uuid\":\"\\u0000\"}", "kInvalidArgument"},
      {std::string("{\"op\":\"\xff\xfe\"}"), "kBadMessage"},  // not UTF-8: not JSON
      {"{\"op\":\"ping\"}", ""},
  };
  std::string batch;
  for (const auto& [req, err] : cases) batch += req + "\r\n\n";  // CRLF and blank lines are tolerated
  SendAll(fd, batch);
  std::string replies = ReadLines(fd, static_cast<int>(cases.size()));
  std::istringstream in(replies);
  std::string line;
  for (const auto& [req, err] : cases) {
    REQUIRE(std::getline(in, line));
    Json j = Json::parse(line, nullptr, false);
    REQUIRE_MESSAGE(j.is_object(), line);
    if (err.empty()) {
      CHECK(j["ok"] == true);
    } else {
      CHECK_MESSAGE(j["ok"] == false, req);
      CHECK_MESSAGE(j["error"] == err, req, " -> ", line);
    }
  }
  close(fd);

  // A line past the limit: kMessageTooLarge, then the daemon closes that client.
  fd = ConnectUnix(d.control());
  REQUIRE(fd >= 0);
  SendAll(fd, "{\"op\":\"list\",\"pad\":\"" + std::string(200 * 1024, 'a'));
  std::string big = ReadLines(fd, 1);
  CHECK(big.find("\"error\":\"kMessageTooLarge\"") != std::string::npos);
  CHECK(ReadLines(fd, 1, 3000).empty());  // closed
  close(fd);

  // A client that vanishes mid-request and one that half-closes after its request.
  fd = ConnectUnix(d.control());
  SendAll(fd, "{\"op\":\"ty");
  close(fd);
  fd = ConnectUnix(d.control());
  SendAll(fd, "{\"op\":\"types\"}\n");
  shutdown(fd, SHUT_WR);
  CHECK(ReadLines(fd, 1).find("\"ok\":true") != std::string::npos);
  close(fd);

  CHECK(d.Alive());
  CHECK(d.Ctl({"types"}).code == 0);
  CHECK(d.Shutdown() == 0);
}
