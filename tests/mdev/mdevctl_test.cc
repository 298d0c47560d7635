// The REAL mdevctl binary, run through tools/mdevctl-ns against a live tree served by this
// process (Manager + MdevTree + a test host whose instances are listening unix sockets).
// Each case mounts a fresh tree on a fresh root; the whole process lives in a private
// mount namespace (ns_main.cc), so nothing stays mounted if a case fails or crashes.

#include <doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "mdev/mdev.h"
#include "tests/mdev/test_host.h"

namespace vg::mdev {
namespace {
using testing::IsListening;
using testing::Slurp;
using testing::TempDir;
using testing::TestHost;
namespace fs = std::filesystem;
using Json = nlohmann::json;
constexpr uint64_t kMiB = 1ull << 20;


std::string Quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

struct Run {
  int rc = -1;
  std::string out, err;
};

bool Contains(const std::string& hay, const std::string& needle) { return hay.find(needle) != std::string::npos; }

struct Env {
  TempDir tmp;
  TestHost host{tmp.path() / "run"};
  std::unique_ptr<Manager> mgr;
  std::unique_ptr<MdevTree> tree;

  explicit Env(ByteSize budget = ByteSize{4096 * kMiB}, const std::string& types_json = "") {
    fs::path types;
    if (!types_json.empty()) {
      types = tmp.path() / "types.json";
      std::ofstream(types) << types_json;
    }
    auto m = Manager::Create({tmp.path(), types, std::nullopt, budget}, host);
    REQUIRE(m.ok());
    mgr = std::move(m).value();
    auto t = MdevTree::Mount(*mgr, tmp.path() / "sys");
    if (!t.ok()) FAIL(t.error().ToString());
    tree = std::move(t).value();
  }
  ~Env() {
    tree.reset();
    mgr->StopAll();
  }

  Run Mdevctl(const std::string& args) const {
    const char* ns = getenv("MDEVCTL_NS");
    REQUIRE_MESSAGE(ns != nullptr, "MDEVCTL_NS not set (run through meson test)");
    const fs::path out = tmp.path() / "out", err = tmp.path() / "err";
    const std::string cmd = fmt::format("{} --root {} -- {} >{} 2>{}", Quote(ns), Quote(tmp.path().string()), args,
                                        Quote(out.string()), Quote(err.string()));
    Run r;
    int st = system(cmd.c_str());
    r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128;
    r.out = Slurp(out);
    r.err = Slurp(err);
    MESSAGE("mdevctl ", args, " -> rc ", r.rc, "\n", r.out, r.err);
    return r;
  }

  fs::path DefFile(const std::string& u) const { return tmp.path() / "etc/mdevctl.d/vgpud0" / u; }
  bool Active(const std::string& u) const {
    auto i = mgr->Show(*Uuid::Parse(u));
    return i.ok() && i->active;
  }
};

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

TEST_CASE("mdevctl types, text and --dumpjson") {
  Env e(ByteSize{1024 * kMiB});
  Run r = e.Mdevctl("types");
  REQUIRE(r.rc == 0);
  CHECK(Contains(r.out, "vgpud0\n  vgpud-large\n    Available instances: 1\n    Device API: vfio-pci\n"
                        "    Name: vgpud large\n    Description: 1 GiB aperture"));
  CHECK(Contains(r.out, "  vgpud-medium\n    Available instances: 4\n"));
  CHECK(Contains(r.out, "  vgpud-small\n    Available instances: 16\n"));

  r = e.Mdevctl("types --dumpjson");
  REQUIRE(r.rc == 0);
  Json j = Json::parse(r.out);
  REQUIRE(j.is_array());
  REQUIRE(j.size() == 1);
  const Json& types = j[0]["vgpud0"];
  REQUIRE(types.size() == 3);
  CHECK(types[2]["vgpud-small"]["available_instances"] == 16);
  CHECK(types[2]["vgpud-small"]["device_api"] == "vfio-pci");
  CHECK(types[2]["vgpud-small"]["name"] == "vgpud small");
  // Live: what the daemon starts shows at once.
  REQUIRE(e.mgr->StartTransient(Uuid::Random(), "vgpud-medium", {}).ok());
  r = e.Mdevctl("types --dumpjson");
  CHECK(Json::parse(r.out)[0]["vgpud0"][2]["vgpud-small"]["available_instances"] == 12);
}

TEST_CASE("mdevctl define (with and without -u), list --defined, modify, undefine") {
  Env e;
  const std::string u = "7c1e0f2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b";
  Run r = e.Mdevctl("define -u " + u + " -p vgpud0 -t vgpud-small");
  REQUIRE(r.rc == 0);
  REQUIRE(fs::is_regular_file(e.DefFile(u)));
  auto d = e.mgr->GetDefinition(*Uuid::Parse(u));  // mdevctl's file, read by vgpud
  REQUIRE(d.ok());
  CHECK(d->type == "vgpud-small");
  CHECK(d->start == StartMode::kManual);

  r = e.Mdevctl("define --auto -p vgpud0 -t vgpud-medium");
  REQUIRE(r.rc == 0);
  const std::string gen = Trim(r.out);
  REQUIRE(Uuid::Parse(gen).ok());
  CHECK(e.mgr->GetDefinition(*Uuid::Parse(gen))->start == StartMode::kAuto);

  // A definition made by vgpud shows in mdevctl.
  auto v = e.mgr->Define({Uuid{}, "vgpud-large", StartMode::kManual, {{"rate_limit", "10"}}});
  REQUIRE(v.ok());
  r = e.Mdevctl("list --defined");
  REQUIRE(r.rc == 0);
  CHECK(Contains(r.out, u + " vgpud0 vgpud-small manual\n"));
  CHECK(Contains(r.out, gen + " vgpud0 vgpud-medium auto\n"));
  CHECK(Contains(r.out, v->ToString() + " vgpud0 vgpud-large manual\n"));
  r = e.Mdevctl("list --defined --dumpjson");
  Json j = Json::parse(r.out);
  CHECK(j[0]["vgpud0"].size() == 3);

  REQUIRE(e.Mdevctl("modify -u " + u + " --addattr=sched_weight --value=50").rc == 0);
  REQUIRE(e.Mdevctl("modify -u " + u + " --addattr=rate_limit --value=7 --index=0").rc == 0);
  REQUIRE(e.Mdevctl("modify -u " + u + " --auto").rc == 0);
  d = e.mgr->GetDefinition(*Uuid::Parse(u));
  CHECK(d->start == StartMode::kAuto);
  CHECK(d->attrs == Attributes{{"rate_limit", "7"}, {"sched_weight", "50"}});
  r = e.Mdevctl("list --defined -v -u " + u);
  CHECK(Contains(r.out, "  Attrs:\n    @{0}: {\"rate_limit\":\"7\"}\n    @{1}: {\"sched_weight\":\"50\"}\n"));
  REQUIRE(e.Mdevctl("modify -u " + u + " --delattr --index=0").rc == 0);
  REQUIRE(e.Mdevctl("modify -u " + u + " --manual").rc == 0);
  REQUIRE(e.Mdevctl("modify -u " + u + " -t vgpud-medium").rc == 0);
  d = e.mgr->GetDefinition(*Uuid::Parse(u));
  CHECK(d->start == StartMode::kManual);
  CHECK(d->type == "vgpud-medium");
  CHECK(d->attrs == Attributes{{"sched_weight", "50"}});

  REQUIRE(e.Mdevctl("undefine -u " + u).rc == 0);
  CHECK(!fs::exists(e.DefFile(u)));
  CHECK(e.mgr->GetDefinition(*Uuid::Parse(u)).code() == Errc::kNotFound);
}

TEST_CASE("mdevctl start (with an attribute), list, stop") {
  Env e;
  const std::string u = "11111111-2222-4333-8444-555555555555";
  REQUIRE(e.Mdevctl("define -u " + u + " -p vgpud0 -t vgpud-small").rc == 0);
  REQUIRE(e.Mdevctl("modify -u " + u + " --addattr=sched_weight --value=7").rc == 0);
  Run r = e.Mdevctl("start -u " + u);
  REQUIRE(r.rc == 0);
  // Done when mdevctl returned: active, socket listening, attribute applied by the host.
  auto i = e.mgr->Show(*Uuid::Parse(u));
  REQUIRE(i.ok());
  REQUIRE(i->active);
  CHECK(IsListening(i->socket_path));
  CHECK(i->attrs == Attributes{{"sched_weight", "7"}});
  CHECK(e.host.attrs(*Uuid::Parse(u)) == Attributes{{"sched_weight", "7"}});
  CHECK(Trim(Slurp(e.tmp.path() / "sys/bus/mdev/devices" / u / "vfio_user_socket")) == i->socket_path);

  r = e.Mdevctl("list");
  REQUIRE(r.rc == 0);
  CHECK(r.out == u + " vgpud0 vgpud-small manual (defined)\n\n");
  r = e.Mdevctl("list --defined");
  CHECK(Contains(r.out, u + " vgpud0 vgpud-small manual (active)\n"));
  r = e.Mdevctl("start -u " + u);
  CHECK(r.rc != 0);  // already running

  // No sleeps: a change made by the daemon is what the next mdevctl sees.
  const Uuid other = Uuid::Random();
  REQUIRE(e.mgr->StartTransient(other, "vgpud-large", {}).ok());
  CHECK(Contains(e.Mdevctl("list").out, other.ToString() + " vgpud0 vgpud-large manual\n"));
  REQUIRE(e.mgr->Stop(other).ok());
  CHECK(!Contains(e.Mdevctl("list").out, other.ToString()));

  r = e.Mdevctl("stop -u " + u);
  REQUIRE(r.rc == 0);
  CHECK(!e.Active(u));
  CHECK(!IsListening(i->socket_path));
  CHECK(Trim(e.Mdevctl("list").out).empty());
  CHECK(fs::exists(e.DefFile(u)));  // stop keeps the definition
}

TEST_CASE("mdevctl transient start -p -t, then define the running device") {
  Env e;
  Run r = e.Mdevctl("start -p vgpud0 -t vgpud-medium");
  REQUIRE(r.rc == 0);
  const std::string u = Trim(r.out);
  REQUIRE(Uuid::Parse(u).ok());
  CHECK(e.Active(u));
  CHECK(!fs::exists(e.DefFile(u)));
  REQUIRE(e.mgr->SetAttribute(*Uuid::Parse(u), "rate_limit", "20").ok());
  r = e.Mdevctl("list --dumpjson");
  Json j = Json::parse(r.out);
  CHECK(j[0]["vgpud0"][0][u]["mdev_type"] == "vgpud-medium");
  // Attributes of an undefined running device come from the callout's `get`.
  CHECK(j[0]["vgpud0"][0][u]["attrs"] == Json::parse(R"([{"rate_limit":"20"}])"));

  r = e.Mdevctl("start -p vgpud0 -t vgpud-medium -u " + u);
  CHECK(r.rc != 0);  // duplicate uuid
  // `define -u` of a running transient device records its type and live attributes.
  REQUIRE(e.Mdevctl("define -u " + u).rc == 0);
  auto d = e.mgr->GetDefinition(*Uuid::Parse(u));
  REQUIRE(d.ok());
  CHECK(d->type == "vgpud-medium");
  CHECK(d->attrs == Attributes{{"rate_limit", "20"}});
  REQUIRE(e.Mdevctl("stop -u " + u).rc == 0);
  CHECK(!e.Active(u));
}

TEST_CASE("mdevctl define and start from --jsonfile") {
  Env e;
  const fs::path json = e.tmp.path() / "dev.json";
  std::ofstream(json) << R"({"mdev_type":"vgpud-small","start":"auto","attrs":[{"rate_limit":"30"},{"sched_weight":"5"}]})";
  const std::string u = "44444444-0000-4000-8000-000000000001";
  REQUIRE(e.Mdevctl("define -u " + u + " -p vgpud0 --jsonfile " + json.string()).rc == 0);
  auto d = e.mgr->GetDefinition(*Uuid::Parse(u));
  REQUIRE(d.ok());
  CHECK(d->start == StartMode::kAuto);
  CHECK(d->attrs == Attributes{{"rate_limit", "30"}, {"sched_weight", "5"}});
  Run r = e.Mdevctl("start -p vgpud0 --jsonfile " + json.string());
  REQUIRE(r.rc == 0);
  const std::string t = Trim(r.out);
  REQUIRE(Uuid::Parse(t).ok());
  // mdevctl wrote the attributes, in order, to the device's files after create.
  CHECK(e.host.attrs(*Uuid::Parse(t)) == Attributes{{"rate_limit", "30"}, {"sched_weight", "5"}});
  r = e.Mdevctl("list -v -u " + t);
  CHECK(Contains(r.out, t + " vgpud0 vgpud-small manual\n  Attrs:\n    @{0}: {\"rate_limit\":\"30\"}\n"));
}

TEST_CASE("mdevctl start-parent-mdevs starts the auto definitions") {
  Env e;
  const std::string a = "aaaaaaaa-0000-4000-8000-000000000001", m = "aaaaaaaa-0000-4000-8000-000000000002";
  REQUIRE(e.Mdevctl("define -u " + a + " -p vgpud0 -t vgpud-small --auto").rc == 0);
  REQUIRE(e.Mdevctl("define -u " + m + " -p vgpud0 -t vgpud-small").rc == 0);
  REQUIRE(e.Mdevctl("start-parent-mdevs vgpud0").rc == 0);
  CHECK(e.Active(a));
  CHECK(!e.Active(m));
  CHECK(e.host.running() == 1);
}

TEST_CASE("mdevctl failures: unknown type, no instances left, callout veto") {
  Env e(ByteSize{4096 * kMiB},
        R"({"types":[{"name":"one","aperture_mib":16,"gtt_entries":4096,"sched_weight":5,"max_instances":1},
                     {"name":"two","aperture_mib":16,"gtt_entries":4096,"sched_weight":5,"max_instances":2}]})");
  // Unknown type: mdevctl would write the definition; the daemon's callout vetoes it.
  Run r = e.Mdevctl("define -u 22222222-0000-4000-8000-000000000001 -p vgpud0 -t vgpud-huge");
  CHECK(r.rc != 0);
  CHECK(Contains(r.err, "unknown type 'vgpud-huge'"));
  CHECK(!fs::exists(e.DefFile("22222222-0000-4000-8000-000000000001")));
  r = e.Mdevctl("start -p vgpud0 -t vgpud-huge");
  CHECK(r.rc != 0);
  CHECK(e.host.running() == 0);

  // No instances left.
  REQUIRE(e.Mdevctl("start -p vgpud0 -t vgpud-one").rc == 0);
  r = e.Mdevctl("start -p vgpud0 -t vgpud-one");
  CHECK(r.rc != 0);
  CHECK(Contains(r.err, "no instances of vgpud-one left"));
  CHECK(e.host.running() == 1);
  CHECK(Contains(e.Mdevctl("types").out, "  vgpud-one\n    Available instances: 0\n"));

  // Vetoes of what the daemon cannot apply, before anything is written or started.
  const std::string u = "33333333-0000-4000-8000-000000000001";
  REQUIRE(e.Mdevctl("define -u " + u + " -p vgpud0 -t vgpud-two").rc == 0);
  const std::string before = Slurp(e.DefFile(u));
  r = e.Mdevctl("modify -u " + u + " --addattr=bogus --value=1");
  CHECK(r.rc != 0);
  CHECK(Contains(r.err, "unknown attribute 'bogus'"));
  r = e.Mdevctl("modify -u " + u + " --addattr=sched_weight --value=0");
  CHECK(r.rc != 0);
  CHECK(Contains(r.err, "sched_weight='0' invalid"));
  r = e.Mdevctl("modify -u " + u + " -t vgpud-huge");
  CHECK(r.rc != 0);
  CHECK(Slurp(e.DefFile(u)) == before);
  // A definition edited behind both our backs: the start is vetoed, nothing is created.
  std::ofstream(e.DefFile(u)) << R"({"mdev_type":"vgpud-two","start":"manual","attrs":[{"rate_limit":"oops"}]})";
  r = e.Mdevctl("start -u " + u);
  CHECK(r.rc != 0);
  CHECK(Contains(r.err, "rate_limit='oops' invalid"));
  CHECK(!e.Active(u));
  CHECK(e.host.running() == 1);
}

}  // namespace
}  // namespace vg::mdev
