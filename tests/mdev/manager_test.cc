// Manager unit tests: budget accounting, definitions on disk, auto-start, callout policy.

#include <doctest.h>

#include <fstream>
#include <atomic>
#include <sstream>
#include <thread>

#include "mdev/mdev.h"
#include "tests/mdev/test_host.h"

namespace vg::mdev {
namespace {
using testing::IsListening;
using testing::Slurp;
using testing::TempDir;
using testing::TestHost;
namespace fs = std::filesystem;
constexpr uint64_t kMiB = 1ull << 20;


struct Fixture {
  TempDir tmp;
  TestHost host{tmp.path() / "run"};
  std::unique_ptr<Manager> mgr;
  explicit Fixture(ByteSize budget = ByteSize{4096 * kMiB}, fs::path types = {}) { Reopen(budget, types); }
  void Reopen(ByteSize budget = ByteSize{4096 * kMiB}, fs::path types = {}) {
    mgr.reset();
    auto m = Manager::Create({tmp.path(), types, std::nullopt, budget}, host);
    REQUIRE(m.ok());
    mgr = std::move(m).value();
  }
};

TEST_CASE("built-in types and the types file") {
  auto d = DefaultTypes();
  REQUIRE(d.size() == 3);
  CHECK(d[0].id == "vgpud-small");
  CHECK(d[0].aperture == ByteSize{64 * kMiB});
  CHECK(d[1].aperture == ByteSize{256 * kMiB});
  CHECK(d[2].aperture == ByteSize{1024 * kMiB});

  auto t = ParseTypes(R"({"types":[{"name":"tiny","aperture_mib":16,"gtt_entries":4096,"sched_weight":10,"max_instances":2}]})");
  REQUIRE(t.ok());
  REQUIRE(t->size() == 1);
  CHECK((*t)[0].id == "vgpud-tiny");
  CHECK((*t)[0].max_instances == 2);
  CHECK(!(*t)[0].description.empty());

  CHECK(ParseTypes("not json").code() == Errc::kInvalidArgument);
  CHECK(ParseTypes(R"({"types":[]})").code() == Errc::kInvalidArgument);
  CHECK(ParseTypes(R"({"types":[{"name":"x","aperture_mib":48,"gtt_entries":1,"sched_weight":1,"max_instances":1}]})")
            .code() == Errc::kInvalidArgument);  // not a power of two
  CHECK(ParseTypes(R"({"types":[{"name":"A/B","aperture_mib":16,"gtt_entries":1,"sched_weight":1,"max_instances":1}]})")
            .code() == Errc::kInvalidArgument);
  CHECK(ParseTypes(R"({"types":[{"name":"a","aperture_mib":16,"gtt_entries":1,"sched_weight":1,"max_instances":1},
                                {"name":"a","aperture_mib":16,"gtt_entries":1,"sched_weight":1,"max_instances":1}]})")
            .code() == Errc::kInvalidArgument);
  // F10 frame pacing: a type's frame_limit, 0..60 (the frame clock), the instances' default.
  auto paced = ParseTypes(
      R"({"types":[{"name":"p","aperture_mib":16,"gtt_entries":1,"sched_weight":1,"max_instances":1,"frame_limit":30}]})");
  REQUIRE(paced.ok());
  CHECK((*paced)[0].frame_limit == 30);
  CHECK(ParseTypes(R"({"types":[{"name":"p","aperture_mib":16,"gtt_entries":1,"sched_weight":1,"max_instances":1,"frame_limit":61}]})")
            .code() == Errc::kInvalidArgument);
  CHECK(ValidateAttribute("frame_limit", "60").ok());
  CHECK(ValidateAttribute("frame_limit", "0").ok());
  for (const std::string bad : {"61", "240", "-1", "thirty", ""}) {
    CAPTURE(bad);
    CHECK(ValidateAttribute("frame_limit", bad).code() == Errc::kInvalidArgument);
  }
}

TEST_CASE("parent: PCI address when given, vgpud0 otherwise") {
  TempDir tmp;
  TestHost host(tmp.path() / "run");
  auto a = Manager::Create({tmp.path(), {}, std::nullopt, ByteSize{kMiB << 10}}, host);
  REQUIRE(a.ok());
  CHECK((*a)->parent() == "vgpud0");
  CHECK(fs::is_directory(tmp.path() / "etc/mdevctl.d/vgpud0"));
  CHECK(fs::is_directory(tmp.path() / "etc/mdevctl.d/scripts.d/callouts"));
  auto b = Manager::Create({tmp.path(), {}, std::string("0000:01:00.0"), ByteSize{kMiB << 10}}, host);
  REQUIRE(b.ok());
  CHECK((*b)->parent() == "0000:01:00.0");
  CHECK(Manager::Create({tmp.path(), {}, std::string("../etc"), ByteSize{kMiB << 10}}, host).code() ==
        Errc::kInvalidArgument);
}

TEST_CASE("available_instances follows the aperture budget and the per-type max") {
  Fixture f(ByteSize{512 * kMiB});
  Manager& m = *f.mgr;
  CHECK(m.AvailableInstances("vgpud-small") == 8);  // 512/64, under the max of 16
  CHECK(m.AvailableInstances("vgpud-medium") == 2);
  CHECK(m.AvailableInstances("vgpud-large") == 0);  // 1 GiB never fits in 512 MiB
  CHECK(m.AvailableInstances("vgpud-nope") == 0);

  Uuid a = Uuid::Random(), b = Uuid::Random(), c = Uuid::Random();
  auto sa = m.StartTransient(a, "vgpud-medium", {});
  REQUIRE(sa.ok());
  CHECK(IsListening(*sa));
  CHECK(m.AvailableInstances("vgpud-small") == 4);
  CHECK(m.AvailableInstances("vgpud-medium") == 1);
  REQUIRE(m.StartTransient(b, "vgpud-medium", {}).ok());
  CHECK(m.AvailableInstances("vgpud-small") == 0);
  CHECK(m.AvailableInstances("vgpud-medium") == 0);
  // Never over-committed: the refusal comes before the host is asked.
  const int starts = f.host.starts();
  CHECK(m.StartTransient(c, "vgpud-small", {}).code() == Errc::kLimitExceeded);
  CHECK(f.host.starts() == starts);
  CHECK(m.StartTransient(a, "vgpud-medium", {}).code() == Errc::kAlreadyExists);
  CHECK(m.StartTransient(c, "vgpud-huge", {}).code() == Errc::kNotFound);

  REQUIRE(m.Stop(a).ok());
  CHECK(!IsListening(*sa));
  CHECK(m.AvailableInstances("vgpud-small") == 4);
  CHECK(m.Stop(a).code() == Errc::kNotFound);
  m.StopAll();
  CHECK(f.host.running() == 0);
  CHECK(m.AvailableInstances("vgpud-medium") == 2);
}

TEST_CASE("concurrent starts never over-commit the budget") {
  Fixture f(ByteSize{640 * kMiB});  // room for exactly 10 small instances
  std::atomic<int> ok{0}, full{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 8; ++i) {
        auto r = f.mgr->StartTransient(Uuid::Random(), "vgpud-small", {});
        if (r.ok()) ++ok;
        else if (r.code() == Errc::kLimitExceeded) ++full;
      }
    });
  for (auto& t : threads) t.join();
  CHECK(ok == 10);
  CHECK(full == 22);
  CHECK(f.host.running() == 10);
  CHECK(f.mgr->AvailableInstances("vgpud-small") == 0);
  f.mgr->StopAll();
}

TEST_CASE("per-type max from a types file") {
  TempDir tdir;
  const fs::path types = tdir.path() / "types.json";
  std::ofstream(types) << R"({"types":[{"name":"one","aperture_mib":16,"gtt_entries":4096,"sched_weight":5,"max_instances":1}]})";
  Fixture f(ByteSize{4096 * kMiB}, types);
  REQUIRE(f.mgr->types().size() == 1);
  CHECK(f.mgr->AvailableInstances("vgpud-one") == 1);
  REQUIRE(f.mgr->StartTransient(Uuid::Random(), "vgpud-one", {}).ok());
  CHECK(f.mgr->AvailableInstances("vgpud-one") == 0);
  CHECK(f.mgr->StartTransient(Uuid::Random(), "vgpud-one", {}).code() == Errc::kLimitExceeded);
  f.mgr->StopAll();
}

TEST_CASE("define, modify, undefine: mdevctl's JSON, round-tripped through a restart") {
  Fixture f;
  const Uuid u = *Uuid::Parse("5b4a3e2c-1d0f-4e6a-9b8c-7d6e5f4a3b2c");
  REQUIRE(f.mgr->Define({u, "vgpud-small", StartMode::kManual, {{"sched_weight", "50"}}}).ok());
  const fs::path file = f.mgr->definitions_dir() / u.ToString();
  REQUIRE(fs::is_regular_file(file));
  // Exactly the shape mdevctl writes and reads.
  CHECK(Slurp(file) ==
        "{\n  \"mdev_type\": \"vgpud-small\",\n  \"start\": \"manual\",\n  \"attrs\": [\n    {\n      \"sched_weight\": "
        "\"50\"\n    }\n  ]\n}\n");
  CHECK(f.mgr->Define({u, "vgpud-small", StartMode::kManual, {}}).code() == Errc::kAlreadyExists);
  CHECK(f.mgr->Define({Uuid::Random(), "vgpud-huge", StartMode::kManual, {}}).code() == Errc::kNotFound);
  CHECK(f.mgr->Define({Uuid::Random(), "vgpud-small", StartMode::kManual, {{"bogus", "1"}}}).code() == Errc::kNotFound);
  CHECK(f.mgr->Define({Uuid::Random(), "vgpud-small", StartMode::kManual, {{"sched_weight", "0"}}}).code() ==
        Errc::kInvalidArgument);
  auto nil = f.mgr->Define({Uuid{}, "vgpud-large", StartMode::kAuto, {}});
  REQUIRE(nil.ok());
  CHECK(!nil->IsNil());

  ModifyRequest add{.add_attr = std::pair<std::string, std::string>{"rate_limit", "100"}, .index = 0};
  REQUIRE(f.mgr->Modify(u, add).ok());
  REQUIRE(f.mgr->Modify(u, {.type = "vgpud-medium", .start = StartMode::kAuto}).ok());
  f.Reopen();  // a restart reads the same files
  auto d = f.mgr->GetDefinition(u);
  REQUIRE(d.ok());
  CHECK(d->type == "vgpud-medium");
  CHECK(d->start == StartMode::kAuto);
  REQUIRE(d->attrs.size() == 2);
  CHECK(d->attrs[0] == std::pair<std::string, std::string>{"rate_limit", "100"});
  CHECK(d->attrs[1] == std::pair<std::string, std::string>{"sched_weight", "50"});
  REQUIRE(f.mgr->Modify(u, {.del_attr = true, .index = 0}).ok());
  REQUIRE(f.mgr->Modify(u, {.start = StartMode::kManual}).ok());
  d = f.mgr->GetDefinition(u);
  REQUIRE(d->attrs.size() == 1);
  CHECK(d->attrs[0].first == "sched_weight");
  CHECK(d->start == StartMode::kManual);
  CHECK(f.mgr->Modify(u, {.type = "vgpud-huge"}).code() == Errc::kNotFound);
  CHECK(f.mgr->Modify(u, {.del_attr = true, .index = 5}).code() == Errc::kInvalidArgument);
  CHECK(f.mgr->GetDefinition(u)->type == "vgpud-medium");  // refused modifications changed nothing

  auto list = f.mgr->ListDefined();
  REQUIRE(list.ok());
  CHECK(list->size() == 2);
  REQUIRE(f.mgr->Undefine(u).ok());
  CHECK(!fs::exists(file));
  CHECK(f.mgr->Undefine(u).code() == Errc::kNotFound);
  CHECK(f.mgr->ListDefined()->size() == 1);
}

TEST_CASE("definitions written by mdevctl are read back") {
  Fixture f;
  const Uuid u = Uuid::Random();
  // serde_json's pretty output, keys in its order, as mdevctl 1.2.0 writes it.
  std::ofstream(f.mgr->definitions_dir() / u.ToString())
      << R"({ "attrs": [ { "rate_limit": "7" } ], "mdev_type": "vgpud-small", "start": "auto" })";
  std::ofstream(f.mgr->definitions_dir() / "not-a-uuid") << "{}";
  auto d = f.mgr->GetDefinition(u);
  REQUIRE(d.ok());
  CHECK(d->start == StartMode::kAuto);
  CHECK(d->attrs.size() == 1);
  CHECK(f.mgr->ListDefined()->size() == 1);
  CHECK(ParseDefinition(u, R"({"mdev_type":"x"})").code() == Errc::kInvalidArgument);
  CHECK(ParseDefinition(u, R"({"mdev_type":"x","start":"auto","attrs":[{"a":1}]})").code() == Errc::kInvalidArgument);
}

TEST_CASE("atomic write: the old file or the new one, never a partial one, no temp left") {
  TempDir tmp;
  const fs::path p = tmp.path() / "def";
  REQUIRE(WriteFileAtomic(p, "old\n").ok());
  REQUIRE(WriteFileAtomic(p, std::string(100000, 'x')).ok());
  CHECK(Slurp(p).size() == 100000);
  // A rename that fails (the target is a non-empty directory) leaves the target as it was
  // and removes its temp file.
  fs::create_directories(tmp.path() / "busy/child");
  CHECK(!WriteFileAtomic(tmp.path() / "busy", "new").ok());
  CHECK(fs::is_directory(tmp.path() / "busy/child"));
  CHECK(!WriteFileAtomic(tmp.path() / "missing/def", "new").ok());
  size_t n = 0;
  for (const auto& e : fs::directory_iterator(tmp.path())) {
    ++n;
    CHECK(e.path().filename().string()[0] != '.');
  }
  CHECK(n == 2);
}

TEST_CASE("atomic write: a concurrent reader sees the old or the new file, nothing between") {
  TempDir tmp;
  const fs::path p = tmp.path() / "def";
  const std::string a(64 * 1024, 'a'), b(48 * 1024, 'b');
  REQUIRE(WriteFileAtomic(p, a).ok());
  std::atomic<bool> done{false};
  std::thread writer([&] {
    for (int i = 0; i < 200; ++i) CHECK(WriteFileAtomic(p, i % 2 ? a : b).ok());
    done = true;
  });
  int torn = 0, reads = 0;
  while (!done) {
    const std::string got = Slurp(p);
    ++reads;
    if (got != a && got != b) ++torn;
  }
  writer.join();
  CHECK(reads > 0);
  CHECK(torn == 0);
}

TEST_CASE("auto-start brings back start:auto definitions only") {
  Fixture f;
  const Uuid a = Uuid::Random(), m = Uuid::Random(), bad = Uuid::Random();
  REQUIRE(f.mgr->Define({a, "vgpud-small", StartMode::kAuto, {{"sched_weight", "9"}}}).ok());
  REQUIRE(f.mgr->Define({m, "vgpud-small", StartMode::kManual, {}}).ok());
  // A definition of a type this daemon no longer offers (types file changed): reported, skipped.
  std::ofstream(f.mgr->definitions_dir() / bad.ToString())
      << R"({"mdev_type":"vgpud-gone","start":"auto","attrs":[]})";
  f.Reopen();
  auto failures = f.mgr->StartAutoInstances();
  CHECK(failures.size() == 1);
  auto active = f.mgr->ListActive();
  REQUIRE(active.size() == 1);
  CHECK(active[0].uuid == a);
  CHECK(active[0].defined);
  CHECK(active[0].start == StartMode::kAuto);
  CHECK(IsListening(active[0].socket_path));
  CHECK(f.host.attrs(a) == Attributes{{"sched_weight", "9"}});
  CHECK(f.mgr->StartAutoInstances().size() == 1);  // idempotent for the running one
  CHECK(f.mgr->ListActive().size() == 1);
  auto sm = f.mgr->Start(m);
  REQUIRE(sm.ok());
  CHECK(f.mgr->Start(Uuid::Random()).code() == Errc::kNotFound);
  REQUIRE(f.mgr->SetAttribute(m, "rate_limit", "5\n").ok());
  CHECK(f.mgr->Show(m)->attrs == Attributes{{"rate_limit", "5"}});
  CHECK(f.mgr->SetAttribute(m, "rate_limit", "-1").code() == Errc::kInvalidArgument);
  f.mgr->StopAll();
}

TEST_CASE("callout answers: veto what the daemon cannot do") {
  Fixture f(ByteSize{64 * kMiB});
  using V = CalloutAnswer::Verdict;
  const std::string u = Uuid::Random().ToString();
  CHECK(f.mgr->AnswerCallout({"pre", "define", "other0", "vgpud-small", u, ""}).verdict == V::kNotOurs);
  CHECK(f.mgr->AnswerCallout({"pre", "define", "vgpud0", "vgpud-small", u, ""}).verdict == V::kOk);
  auto unk = f.mgr->AnswerCallout({"pre", "define", "vgpud0", "vgpud-huge", u, ""});
  CHECK(unk.verdict == V::kVeto);
  CHECK(unk.message.find("unknown type") != std::string::npos);
  auto attr = f.mgr->AnswerCallout(
      {"pre", "modify", "vgpud0", "vgpud-small", u, R"({"mdev_type":"vgpud-small","start":"manual","attrs":[{"x":"1"}]})"});
  CHECK(attr.verdict == V::kVeto);
  CHECK(f.mgr->AnswerCallout({"pre", "start", "vgpud0", "vgpud-medium", u, ""}).verdict == V::kVeto);  // 256 > 64 MiB
  CHECK(f.mgr->AnswerCallout({"pre", "start", "vgpud0", "vgpud-small", u, ""}).verdict == V::kOk);
  CHECK(f.mgr->AnswerCallout({"post", "start", "vgpud0", "vgpud-huge", u, ""}).verdict == V::kOk);
  REQUIRE(f.mgr->StartTransient(*Uuid::Parse(u), "vgpud-small", {{"rate_limit", "3"}}).ok());
  auto get = f.mgr->AnswerCallout({"get", "attributes", "vgpud0", "vgpud-small", u, ""});
  CHECK(get.verdict == V::kOk);
  CHECK(get.message == R"([{"rate_limit":"3"}])");
  f.mgr->StopAll();
}

}  // namespace
}  // namespace vg::mdev
