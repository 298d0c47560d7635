// F7: the supervisor's Prometheus endpoint (vgpud --metrics, docs/management.md "Metrics").
// The real vgpud with real guests: the page parses under a strict parser of the exposition
// format 0.0.4, every counter of the worker channel's table is on it and moves with a real
// workload, and equals what `vgpuctl show` reports; hostile clients (oversized requests,
// slowloris, many connections, other methods) change nothing for the daemon (the control
// socket answers, a victim tenant's results stay bit-exact, no worker misses a heartbeat);
// and the real Prometheus server scrapes it and reads back the counts the test produced.

#include <doctest.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "guest/guest.h"
#include "tests/e2e/guest_checks.h"
#include "tests/e2e/victim.h"
#include "tests/mdev/daemon_harness.h"
#include "tools/vgpud/metrics.h"
#include "tools/vgpud/worker_channel.h"

using namespace vg;
using namespace vg::guest;
using vg::e2e::CheckVictim;
using vg::e2e::Victim;
using vg::mgmt::DaemonProc;
using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;
namespace ch = vg::daemon::channel;

namespace {

constexpr const char* kA = "aaaaaaaa-0000-4000-8000-0000000000f7";
constexpr const char* kB = "bbbbbbbb-0000-4000-8000-0000000000f7";

double Slow() {
  const char* f = std::getenv("VG_SLOW_FACTOR");
  const double k = f ? std::atof(f) : 1.0;
  return k > 0 ? k : 1.0;
}
int Ms(double ms) { return static_cast<int>(ms * Slow()); }
double MsSince(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

bool WaitFor(const std::function<bool()>& pred, int ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(ms);
  while (Clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return pred();
}

// ---- a strict parser of the text exposition format 0.0.4 ----------------------------------
// Stricter than the format: every family has exactly one HELP and one TYPE, in that order,
// before its samples; a family's lines are contiguous; only counter and gauge; a counter is
// named *_total and never negative; no timestamps, no empty lines, no other comments; no
// series twice. Whatever vgpud prints must pass it.

struct Sample {
  std::map<std::string, std::string> labels;
  double value = 0;
};
struct Family {
  std::string help, type;
  std::vector<Sample> samples;
};
struct Exposition {
  std::map<std::string, Family> families;
  std::string error;  // "" when the text parsed
  // The value of the one sample of `name` whose labels include `want`; nullopt when none or several.
  std::optional<double> Get(const std::string& name, const std::map<std::string, std::string>& want = {}) const {
    auto it = families.find(name);
    if (it == families.end()) return std::nullopt;
    std::optional<double> found;
    for (const Sample& s : it->second.samples) {
      bool match = true;
      for (const auto& [k, v] : want) {
        auto l = s.labels.find(k);
        match &= l != s.labels.end() && l->second == v;
      }
      if (!match) continue;
      if (found) return std::nullopt;
      found = s.value;
    }
    return found;
  }
};

bool IsMetricName(std::string_view s) {
  if (s.empty() || !(std::isalpha(static_cast<unsigned char>(s[0])) || s[0] == '_' || s[0] == ':')) return false;
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == ':')) return false;
  return true;
}
bool IsLabelName(std::string_view s) {
  if (s.empty() || !(std::isalpha(static_cast<unsigned char>(s[0])) || s[0] == '_')) return false;
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_')) return false;
  return true;
}

// Go's ParseFloat as Prometheus applies it, restricted to decimal forms and the three words.
std::optional<double> ParseValue(const std::string& s) {
  if (s == "NaN") return std::nan("");
  if (s == "+Inf") return HUGE_VAL;
  if (s == "-Inf") return -HUGE_VAL;
  if (s.empty() || s.find_first_not_of("0123456789.eE+-") != std::string::npos) return std::nullopt;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size()) return std::nullopt;
  return v;
}

Exposition ParseExposition(std::string_view text) {
  Exposition e;
  auto fail = [&](size_t line_no, const std::string& why, std::string_view line) {
    e.error = fmt::format("line {}: {}: '{}'", line_no, why, std::string(line.substr(0, 160)));
    return e;
  };
  if (text.empty() || text.back() != '\n') return fail(0, "empty, or no newline at the end", "");
  std::string current;                 // the family whose lines these are
  std::map<std::string, bool> closed;  // families whose lines ended
  size_t line_no = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t nl = text.find('\n', pos);
    std::string_view line = text.substr(pos, nl - pos);
    pos = nl + 1;
    ++line_no;
    if (line.empty()) return fail(line_no, "empty line", line);
    if (line.find('\r') != std::string_view::npos) return fail(line_no, "carriage return", line);
    if (line[0] == '#') {
      const bool help = line.substr(0, 7) == "# HELP ", type = line.substr(0, 7) == "# TYPE ";
      if (!help && !type) return fail(line_no, "a comment that is neither HELP nor TYPE", line);
      std::string_view rest = line.substr(7);
      const size_t sp = rest.find(' ');
      if (sp == std::string_view::npos) return fail(line_no, "no text after the name", line);
      const std::string name(rest.substr(0, sp));
      const std::string_view arg = rest.substr(sp + 1);
      if (!IsMetricName(name)) return fail(line_no, "bad metric name", line);
      Family& f = e.families[name];
      if (help) {
        if (!f.help.empty() || !f.type.empty() || closed.count(name)) return fail(line_no, "HELP again", line);
        if (!current.empty() && current != name) closed[current] = true;
        current = name;
        // Escapes in HELP: \\ and \n only.
        std::string h;
        for (size_t i = 0; i < arg.size(); ++i) {
          if (arg[i] != '\\') {
            h += arg[i];
            continue;
          }
          if (i + 1 >= arg.size() || (arg[i + 1] != '\\' && arg[i + 1] != 'n'))
            return fail(line_no, "bad escape in HELP", line);
          h += arg[++i] == 'n' ? '\n' : '\\';
        }
        if (h.empty()) return fail(line_no, "empty HELP", line);
        f.help = h;
      } else {
        if (current != name || f.help.empty()) return fail(line_no, "TYPE not right after its HELP", line);
        if (!f.type.empty()) return fail(line_no, "TYPE again", line);
        if (arg != "counter" && arg != "gauge") return fail(line_no, "type other than counter or gauge", line);
        if (arg == "counter" && !(name.size() > 6 && name.substr(name.size() - 6) == "_total"))
          return fail(line_no, "a counter not named *_total", line);
        f.type = std::string(arg);
      }
      continue;
    }
    // name{l="v",...} value
    size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
    const std::string name(line.substr(0, i));
    if (!IsMetricName(name)) return fail(line_no, "bad metric name", line);
    if (name != current || e.families[name].type.empty())
      return fail(line_no, "a sample outside its family's HELP/TYPE block", line);
    Sample s;
    if (i < line.size() && line[i] == '{') {
      ++i;
      while (i < line.size() && line[i] != '}') {
        size_t eq = line.find('=', i);
        if (eq == std::string_view::npos) return fail(line_no, "label without '='", line);
        const std::string lname(line.substr(i, eq - i));
        if (!IsLabelName(lname)) return fail(line_no, "bad label name", line);
        i = eq + 1;
        if (i >= line.size() || line[i] != '"') return fail(line_no, "label value not quoted", line);
        ++i;
        std::string v;
        for (;;) {
          if (i >= line.size()) return fail(line_no, "unterminated label value", line);
          const char c = line[i++];
          if (c == '"') break;
          if (c != '\\') {
            v += c;
            continue;
          }
          if (i >= line.size()) return fail(line_no, "unterminated escape", line);
          const char x = line[i++];
          if (x == '\\') v += '\\';
          else if (x == '"') v += '"';
          else if (x == 'n') v += '\n';
          else return fail(line_no, "bad escape in a label value", line);
        }
        if (!s.labels.emplace(lname, v).second) return fail(line_no, "label twice", line);
        if (i < line.size() && line[i] == ',') {
          ++i;
          if (i < line.size() && line[i] == '}') return fail(line_no, "trailing comma", line);
        } else if (i >= line.size() || line[i] != '}') {
          return fail(line_no, "no ',' or '}' after a label", line);
        }
      }
      if (i >= line.size()) return fail(line_no, "no '}'", line);
      ++i;
    }
    if (i >= line.size() || line[i] != ' ') return fail(line_no, "no single space before the value", line);
    const std::string value(line.substr(i + 1));
    if (value.find(' ') != std::string::npos) return fail(line_no, "more than a value (a timestamp?)", line);
    auto v = ParseValue(value);
    if (!v) return fail(line_no, "bad value", line);
    s.value = *v;
    Family& f = e.families[name];
    if (f.type == "counter" && !(s.value >= 0)) return fail(line_no, "negative or NaN counter", line);
    for (const Sample& o : f.samples)
      if (o.labels == s.labels) return fail(line_no, "the same series twice", line);
    f.samples.push_back(std::move(s));
  }
  for (const auto& [name, f] : e.families)
    if (f.type.empty()) return fail(0, "family without TYPE: " + name, "");
  return e;
}

// ---- HTTP, the minimum ------------------------------------------------------------------------

int ConnectTcp(const std::string& hostport) {
  const size_t colon = hostport.rfind(':');
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(std::stoi(hostport.substr(colon + 1))));
  if (::inet_pton(AF_INET, hostport.substr(0, colon).c_str(), &a.sin_addr) != 1) return -1;
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Everything the peer sends until it closes, or until timeout_ms; `*eof` says which.
std::string ReadAll(int fd, int timeout_ms, bool* eof = nullptr) {
  std::string in;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  if (eof) *eof = false;
  while (Clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 50) <= 0) continue;
    char buf[16384];
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) {  // EOF or a reset: the server is done with us
      if (eof) *eof = true;
      break;
    }
    in.append(buf, static_cast<size_t>(n));
  }
  return in;
}

struct HttpReply {
  int status = -1;
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;
};

HttpReply ParseHttp(const std::string& raw) {
  HttpReply r;
  const size_t end = raw.find("\r\n\r\n");
  if (raw.compare(0, 5, "HTTP/") != 0 || end == std::string::npos) return r;
  const size_t sp = raw.find(' ');
  r.status = std::atoi(raw.c_str() + sp + 1);
  size_t pos = raw.find("\r\n") + 2;
  while (pos < end) {
    const size_t eol = raw.find("\r\n", pos);
    const std::string line = raw.substr(pos, eol - pos);
    const size_t colon = line.find(':');
    std::string k = line.substr(0, colon);
    for (char& c : k) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    r.headers[k] = line.substr(line.find_first_not_of(' ', colon + 1));
    pos = eol + 2;
  }
  r.body = raw.substr(end + 4);
  return r;
}

HttpReply Exchange(const std::string& addr, std::string_view request, int timeout_ms = 10000) {
  int fd = ConnectTcp(addr);
  if (fd < 0) return {};
  mgmt::SendAll(fd, request);
  const std::string raw = ReadAll(fd, timeout_ms);
  ::close(fd);
  return ParseHttp(raw);
}

HttpReply Get(const std::string& addr, const std::string& target) {
  return Exchange(addr, "GET " + target + " HTTP/1.0\r\nHost: " + addr + "\r\n\r\n");
}

Exposition Scrape(const std::string& addr) {
  HttpReply r = Get(addr, "/metrics");
  if (r.status != 200) {
    Exposition e;
    e.error = fmt::format("HTTP status {}", r.status);
    return e;
  }
  return ParseExposition(r.body);
}

// ---- the daemon ---------------------------------------------------------------------------------

Json Control(const DaemonProc& d, const Json& req, double* took_ms = nullptr) {
  const auto t0 = Clock::now();
  int fd = mgmt::ConnectUnix(d.control());
  if (fd < 0) return Json();
  mgmt::SendAll(fd, req.dump() + "\n");
  const std::string line = mgmt::ReadLines(fd, 1, 20000);
  ::close(fd);
  if (took_ms) *took_ms = MsSince(t0);
  return Json::parse(line, nullptr, false);
}

Json Show(const DaemonProc& d, const std::string& uuid) { return Control(d, {{"op", "show"}, {"uuid", uuid}}); }

// vgpud serving A and B, metrics on an ephemeral loopback port, a fast heartbeat.
void StartAB(DaemonProc& d, std::vector<std::string> extra = {}) {
  std::vector<std::string> a{"--heartbeat-ms", "100", "--metrics", "0"};
  for (const char* u : {kA, kB}) a.insert(a.end(), {"--vgpu", std::string(u) + ":small"});
  a.insert(a.end(), extra.begin(), extra.end());
  REQUIRE(d.Start(a));
}

// The bound address, found the way an operator finds it: `vgpuctl status`.
std::string MetricsAddress(const DaemonProc& d) {
  int code = -1;
  Json r = d.CtlJson({"status"}, &code);
  REQUIRE(code == 0);
  REQUIRE_MESSAGE(r["metrics"].is_string(), r.dump());
  return r["metrics"].get<std::string>();
}

std::string MetricName(const ch::CounterName& c) { return daemon::CounterMetricName(c.name, c.gauge); }
// What the page shows for a value `vgpuctl show` reports: *_ns counters are in seconds.
double Exported(const ch::CounterName& c, uint64_t raw) {
  const bool ns = !c.gauge && c.name.size() > 3 && c.name.substr(c.name.size() - 3) == "_ns";
  return ns ? static_cast<double>(raw) / 1e9 : static_cast<double>(raw);
}

// Every counter of the table, for one vGPU: the page's value equals show's. "" when equal.
std::string CompareWithShow(const Exposition& e, const Json& show, const std::string& uuid) {
  if (!show.contains("counters")) return "show has no counters";
  for (const ch::CounterName& c : ch::kCounterNames) {
    auto got = e.Get(MetricName(c), {{"uuid", uuid}});
    const uint64_t want = show["counters"].value(std::string(c.name), uint64_t{0});
    if (!got) return fmt::format("{} has no sample for {}", MetricName(c), uuid);
    if (*got != Exported(c, want)) return fmt::format("{}: page {} show {}", MetricName(c), *got, want);
  }
  return "";
}

struct TestGuest {
  std::unique_ptr<Device> dev;
  std::unique_ptr<Driver> drv;
  explicit TestGuest(const std::string& socket) {
    dev = e2e::OpenGuest(socket, 16 << 20);
    auto r = Driver::Create(*dev);
    REQUIRE(r.ok());
    drv = std::move(r).value();
  }
};

// One catalogue kernel through the mediated path (one submission), checked bit-exactly.
Result<> RunOne(Driver& drv, uint32_t round) {
  auto kernels = shaders::AllKernels();
  const auto& k = kernels[round % kernels.size()];
  auto s = shaders::MakeSample(k.id, 100 + round, round);
  std::vector<GpuBuffer> bufs;
  std::vector<Binding> binds;
  for (size_t i = 0; i < s.bindings.size(); ++i) {
    VG_TRY_ASSIGN(GpuBuffer b, drv.Alloc(s.bindings[i].size()));
    std::memcpy(b.host.data(), s.bindings[i].data(), s.bindings[i].size());
    binds.push_back(Bind(b, e2e::AccessOf(k.bindings[i].access)));
    bufs.push_back(b);
  }
  CommandBuilder cb;
  cb.Dispatch(s.kernel, s.groups, binds, s.push);
  VG_TRY_ASSIGN(uint64_t seq, drv.Submit(cb));
  VG_TRY(drv.Wait(seq, WaitMode::kIrq, 30000));
  std::vector<std::vector<std::byte>> out;
  for (auto& b : bufs) {
    out.emplace_back(b.host.begin(), b.host.end());
    (void)drv.Free(b);
  }
  return shaders::CheckSample(s, out);
}

uint64_t ShownCounter(const DaemonProc& d, const std::string& uuid, const char* name) {
  Json s = Show(d, uuid);
  return s.contains("counters") ? s["counters"].value(name, uint64_t{0}) : 0;
}

}  // namespace

// ---- the page, without a daemon -----------------------------------------------------------------

TEST_CASE("the strict parser refuses what the format (or our stricter reading of it) forbids") {
  const std::string ok = "# HELP a_total x\n# TYPE a_total counter\na_total{l=\"v\"} 1\n";
  CHECK(ParseExposition(ok).error == "");
  for (const std::string& bad : {
           std::string("# TYPE a_total counter\na_total 1\n"),                              // no HELP
           std::string("# HELP a x\na 1\n"),                                                 // no TYPE
           std::string("# HELP a_total x\n# TYPE a_total counter\na_total -1\n"),            // negative counter
           std::string("# HELP a x\n# TYPE a counter\na 1\n"),                               // counter not *_total
           std::string("# HELP a x\n# TYPE a gauge\na{l=\"v\"} 1\na{l=\"v\"} 2\n"),          // same series twice
           std::string("# HELP a x\n# TYPE a gauge\na{l=\"a\\tb\"} 1\n"),                    // bad escape
           std::string("# HELP a x\n# TYPE a gauge\na{l=\"v\",} 1\n"),                       // trailing comma
           std::string("# HELP a x\n# TYPE a gauge\na 1 1700000000\n"),                      // timestamp
           std::string("# HELP a x\n# TYPE a gauge\na 1"),                                  // no final newline
           std::string("# HELP a x\n# TYPE a gauge\n# HELP b x\n# TYPE b gauge\na 1\n"),     // sample out of its block
           std::string("# HELP a x\n# TYPE a gauge\na 1\n\n"),                               // empty line
           std::string("# HELP a x\n# TYPE a gauge\na one\n"),                               // bad value
       }) {
    INFO(bad);
    CHECK(ParseExposition(bad).error != "");
  }
}

TEST_CASE("the page: every counter of the channel's table, label values escaped, absent counters left out") {
  daemon::DaemonSample d;
  d.version = "0.1.0";
  d.parent = "odd \"parent\" \\ with\nnewline";  // --parent is checked, but the page must not rely on it
  d.vgpus_defined = 3;
  d.scrapes = 7;
  daemon::VgpuSample a{kA, {}};
  a.status.type = "vgpud-\"small\"";
  a.status.state = "running";
  a.status.pid = 1234;
  a.status.rss_bytes = 1 << 20;
  a.status.heartbeat_age_ms = 42;
  std::array<uint64_t, 32> values{};
  for (size_t i = 0; i < values.size(); ++i) values[i] = 1000000007ull * (i + 1);
  a.status.counters = values;
  daemon::SchedEntryStatus sched;
  sched.state = daemon::SchedState::kWaiting;
  sched.grants = 12;
  sched.wait_ns = 2'500'000'000;
  sched.overruns = 3;
  sched.overrun_ns = 4'000'000;
  a.status.sched = sched;
  daemon::VgpuSample b{kB, {}};
  b.status.type = "vgpud-small";
  b.status.state = "restarting";  // no pong yet: no counters
  const std::string text = daemon::RenderMetrics(d, {a, b}, 0.00025);
  Exposition e = ParseExposition(text);
  REQUIRE_MESSAGE(e.error == "", e.error, "\n", text);
  // Escaped on the way out, the same string on the way back in.
  CHECK(e.Get("vgpud_vgpus_defined", {{"parent", d.parent}}) == 3.0);
  CHECK(e.Get("vgpud_worker_state", {{"uuid", kA}, {"type", a.status.type}, {"state", "running"}}) == 1.0);
  CHECK(e.Get("vgpud_worker_state", {{"uuid", kB}, {"state", "restarting"}}) == 1.0);
  CHECK(e.Get("vgpud_worker_state", {{"uuid", kB}, {"state", "running"}}) == 0.0);
  CHECK(e.Get("vgpud_worker_heartbeat_age_seconds", {{"uuid", kA}}) == 0.042);
  CHECK(!e.Get("vgpud_worker_heartbeat_age_seconds", {{"uuid", kB}}));
  CHECK(e.Get("vgpud_scrape_duration_seconds") == 0.00025);
  // The supervisor's scheduler, for the vGPU it knows (B: none).
  CHECK(e.Get("vgpud_sched_state", {{"uuid", kA}, {"state", "waiting"}}) == 1.0);
  CHECK(e.Get("vgpud_sched_state", {{"uuid", kA}, {"state", "running"}}) == 0.0);
  CHECK(e.Get("vgpud_sched_grants_total", {{"uuid", kA}}) == 12.0);
  CHECK(e.Get("vgpud_sched_wait_seconds_total", {{"uuid", kA}}) == 2.5);
  CHECK(e.Get("vgpud_sched_overruns_total", {{"uuid", kA}}) == 3.0);
  CHECK(e.Get("vgpud_sched_overrun_seconds_total", {{"uuid", kA}}) == 0.004);
  CHECK(!e.Get("vgpud_sched_grants_total", {{"uuid", kB}}));
  for (const ch::CounterName& c : ch::kCounterNames) {
    INFO(c.name);
    REQUIRE(e.families.count(MetricName(c)) == 1);
    CHECK(e.families[MetricName(c)].type == (c.gauge ? "gauge" : "counter"));
    CHECK(e.Get(MetricName(c), {{"uuid", kA}}) == Exported(c, values[static_cast<size_t>(c.counter)]));
    CHECK(!e.Get(MetricName(c), {{"uuid", kB}}));  // B has no counters: no sample, not a 0
  }
  CHECK(daemon::CounterMetricName("gpu_time_ns", false) == "vgpud_gpu_time_seconds_total");
  CHECK(daemon::CounterMetricName("health", true) == "vgpud_health");
}

TEST_CASE("--metrics addresses: loopback by default, a remote one only with --metrics-allow-remote") {
  CHECK(daemon::ParseMetricsAddress("0", false).ok());
  CHECK(daemon::ParseMetricsAddress("9100", false).ok());
  CHECK(daemon::ParseMetricsAddress("127.0.0.1:0", false).ok());
  CHECK(daemon::ParseMetricsAddress("127.1.2.3:9100", false).ok());
  CHECK(daemon::ParseMetricsAddress("localhost:9100", false).ok());
  CHECK(daemon::ParseMetricsAddress("[::1]:9100", false).ok());
  for (const char* remote : {"0.0.0.0:9100", "10.0.0.1:9100", "[::]:9100", "[2001:db8::1]:9100"}) {
    INFO(remote);
    CHECK(daemon::ParseMetricsAddress(remote, false).code() == Errc::kAccessDenied);
    CHECK(daemon::ParseMetricsAddress(remote, true).ok());
  }
  for (const char* bad : {"", "65536", "-1", "x:1", "example.org:9100", "::1:9100", "[::1]", "127.0.0.1:", "1.2.3.4:9x"}) {
    INFO(bad);
    CHECK(daemon::ParseMetricsAddress(bad, true).code() == Errc::kInvalidArgument);
  }
  // The daemon refuses to start on a remote address without the flag (exit 2, usage).
  auto r = mgmt::RunCapture({mgmt::Env("VGPUD", "tools/vgpud"), "--metrics", "0.0.0.0:0", "--runtime-dir",
                             (fs::temp_directory_path() / "vgpud-metrics-refused").string()});
  CHECK(r.code == 2);
  CHECK(r.err.find("--metrics-allow-remote") != std::string::npos);
}

// ---- the page of a real daemon --------------------------------------------------------------------

TEST_CASE("the endpoint's page parses, has every counter, moves with a real workload and equals vgpuctl show") {
  DaemonProc d;
  StartAB(d);
  const std::string addr = MetricsAddress(d);
  const std::string parent = d.CtlJson({"status"})["parent"].get<std::string>();
  CHECK(addr.rfind("127.0.0.1:", 0) == 0);
  CHECK(addr != "127.0.0.1:0");
  CHECK(d.Log().find("metrics at http://" + addr + "/metrics") != std::string::npos);
  mgmt::Ran human = d.Ctl({"status"});
  CHECK(human.code == 0);
  CHECK(human.out.find(addr) != std::string::npos);

  HttpReply r = Get(addr, "/metrics");
  REQUIRE(r.status == 200);
  CHECK(r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8");
  CHECK(r.headers["content-length"] == std::to_string(r.body.size()));

  // Both workers have answered a ping (counters are the last pong's).
  Exposition e;
  REQUIRE_MESSAGE(WaitFor(
                      [&] {
                        e = Scrape(addr);
                        return e.error.empty() && e.Get("vgpud_submissions_total", {{"uuid", kA}}) &&
                               e.Get("vgpud_submissions_total", {{"uuid", kB}});
                      },
                      Ms(10000)),
                  e.error);
  for (const ch::CounterName& c : ch::kCounterNames) {
    INFO(MetricName(c));
    REQUIRE(e.families.count(MetricName(c)) == 1);
    CHECK(e.families[MetricName(c)].type == (c.gauge ? "gauge" : "counter"));
    CHECK(e.families[MetricName(c)].samples.size() == 2);
  }
  CHECK(e.Get("vgpud_build_info", {{"version", "0.1.0"}}) == 1.0);
  CHECK(e.Get("vgpud_vgpus_running") == 2.0);
  CHECK(e.Get("vgpud_vgpus_active") == 2.0);
  CHECK(e.Get("vgpud_vgpus_defined") == 0.0);  // --vgpu starts are transient
  for (const char* u : {kA, kB}) {
    INFO(u);
    CHECK(e.Get("vgpud_worker_state", {{"uuid", u}, {"type", "vgpud-small"}, {"parent", parent}, {"state", "running"}}) == 1.0);
    CHECK(e.Get("vgpud_worker_state", {{"uuid", u}, {"state", "failed"}}) == 0.0);
    CHECK(e.Get("vgpud_worker_restarts_total", {{"uuid", u}}) == 0.0);
    CHECK(e.Get("vgpud_worker_ends_total", {{"uuid", u}, {"kind", "crash"}}) == 0.0);
    CHECK(e.Get("vgpud_worker_resident_memory_bytes", {{"uuid", u}}).value_or(0) > 0);
    CHECK(e.Get("vgpud_worker_open_fds", {{"uuid", u}}).value_or(0) > 0);
    CHECK(e.Get("vgpud_worker_threads", {{"uuid", u}}).value_or(0) > 0);
    CHECK(e.Get("vgpud_worker_heartbeat_age_seconds", {{"uuid", u}}).value_or(99) < 4.0);
  }
  const double scrapes = e.Get("vgpud_metrics_scrapes_total").value_or(0);
  CHECK(scrapes >= 2);

  // A definition shows in the definitions gauge within its refresh (about a second).
  CHECK(d.Ctl({"define", "-t", "small"}).code == 0);
  CHECK(WaitFor([&] { return Scrape(addr).Get("vgpud_vgpus_defined") == 1.0; }, Ms(10000)));

  // A real workload on A: N kernels, one submission each, checked bit-exactly; B gets
  // vgpu-guest's selftest (doorbells, an IRQ test, a refused register write).
  constexpr uint32_t kRounds = 12;
  {
    TestGuest g(d.Socket(kA));
    const uint64_t before = ShownCounter(d, kA, "submissions");
    for (uint32_t i = 0; i < kRounds; ++i) REQUIRE(RunOne(*g.drv, i).ok());
    mgmt::Ran selftest = mgmt::RunCapture({mgmt::Env("VGPU_GUEST", "tools/vgpu-guest"), "--socket", d.Socket(kB),
                                           "selftest"});
    CHECK(selftest.code == 0);
    // The page shows the last heartbeat's counters and show asks for fresh ones: they agree
    // once a heartbeat has passed with nothing moving. Show falls back to the last heartbeat
    // when the worker's answer is late (a loaded host), so both can agree on counters from
    // before the workload: wait until they agree on ones that have moved.
    std::string diff_a, diff_b;
    const bool agreed = WaitFor(
        [&] {
          Exposition now = Scrape(addr);
          if (!now.error.empty()) {
            diff_a = now.error;
            return false;
          }
          diff_a = CompareWithShow(now, Show(d, kA), kA);
          diff_b = CompareWithShow(Scrape(addr), Show(d, kB), kB);
          e = std::move(now);
          const bool moved = e.Get("vgpud_submissions_total", {{"uuid", kA}}) == static_cast<double>(before + kRounds) &&
                             e.Get("vgpud_doorbells_total", {{"uuid", kB}}).value_or(0) >= 1 &&
                             e.Get("vgpud_mmio_refusals_total", {{"uuid", kB}}).value_or(0) >= 1;
          return diff_a.empty() && diff_b.empty() && moved;
        },
        Ms(10000));
    INFO("A: ", diff_a, " B: ", diff_b);
    CHECK(agreed);
    CHECK(e.Get("vgpud_submissions_total", {{"uuid", kA}}) == static_cast<double>(before + kRounds));
    CHECK(e.Get("vgpud_commands_audited_total", {{"uuid", kA}}).value_or(0) >= kRounds);
    CHECK(e.Get("vgpud_plans_executed_total", {{"uuid", kA}}).value_or(0) >= kRounds);
    CHECK(e.Get("vgpud_irqs_total", {{"uuid", kA}}).value_or(0) >= kRounds);
    // One submission at a time to an idle vGPU, its buffers imported after the first: the
    // loop submits them itself (F12 inline submission), while time coarsening keeps the
    // completions on the executor's thread (no inline completion).
    CHECK(e.Get("vgpud_plans_inline_submitted_total", {{"uuid", kA}}).value_or(0) >= 1);
    CHECK(e.Get("vgpud_plans_inline_total", {{"uuid", kA}}) == 0.0);
    CHECK(e.Get("vgpud_gpu_time_seconds_total", {{"uuid", kA}}).value_or(0) > 0);  // ns on the wire, s here
    CHECK(e.Get("vgpud_vfio_user_clients", {{"uuid", kA}}) == 1.0);  // g is still connected
    CHECK(e.Get("vgpud_doorbells_total", {{"uuid", kB}}).value_or(0) >= 1);
    CHECK(e.Get("vgpud_mmio_refusals_total", {{"uuid", kB}}).value_or(0) >= 1);
    CHECK(e.Get("vgpud_submissions_total", {{"uuid", kB}}) == 0.0);
  }
  CHECK(e.Get("vgpud_metrics_scrapes_total").value_or(0) > scrapes);
  CHECK(d.Shutdown() == 0);
}

// ---- hostile clients -------------------------------------------------------------------------------

namespace {

uint32_t OpenFds(pid_t pid) {
  uint32_t n = 0;
  std::error_code ec;
  for (auto it = fs::directory_iterator(fmt::format("/proc/{}/fd", pid), ec); !ec && it != fs::directory_iterator();
       it.increment(ec))
    ++n;
  return n;
}

// The control socket answers while the attack runs: `show` of the victim and `ping`.
struct ControlProbe {
  std::atomic<bool> stop{false};
  std::atomic<int> answered{0}, failed{0};
  std::atomic<int64_t> slowest_us{0};
  std::thread t;
  ControlProbe(const DaemonProc& d, std::string other) {
    t = std::thread([this, &d, other] {
      while (!stop) {
        for (const Json& req : {Json{{"op", "show"}, {"uuid", other}}, Json{{"op", "ping"}}}) {
          double took = 0;
          Json r = Control(d, req, &took);
          (r.is_object() && r.value("ok", false) ? answered : failed)++;
          slowest_us = std::max<int64_t>(slowest_us, static_cast<int64_t>(took * 1000));
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    });
  }
  void Check(double bound_ms) {
    stop = true;
    t.join();
    INFO("control: ", answered.load(), " answered, ", failed.load(), " failed, slowest ", slowest_us / 1000.0, " ms");
    CHECK(answered > 0);
    CHECK(failed == 0);
    CHECK(slowest_us / 1000.0 <= bound_ms);
  }
};

}  // namespace

TEST_CASE("hostile clients of the endpoint: bounded, answered by name, and the daemon never notices") {
  DaemonProc d;
  StartAB(d);
  const std::string addr = MetricsAddress(d);
  Victim v(d.Socket(kB));
  ControlProbe probe(d, kB);
  const uint32_t fds_before = OpenFds(d.pid());
  constexpr int kMaxClients = 16;     // MetricsLimits
  const int deadline_ms = 5000;       // MetricsLimits::deadline_ms
  uint32_t fds_peak = fds_before;

  {
    // Slowloris: connections that send nothing, and some that trickle a header byte at a
    // time. The server holds at most kMaxClients; the rest get 503 and a close at once.
    std::vector<int> silent;
    for (int i = 0; i < 3 * kMaxClients; ++i) {
      int fd = ConnectTcp(addr);
      REQUIRE(fd >= 0);
      silent.push_back(fd);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    fds_peak = std::max(fds_peak, OpenFds(d.pid()));
    // The ones past the bound were answered 503 and closed, without waiting for a request.
    int turned_away = 0;
    for (int fd : silent) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 0) == 1) {
        char buf[64] = {};
        if (::read(fd, buf, sizeof buf - 1) > 0 && std::string(buf).rfind("HTTP/1.0 503", 0) == 0) ++turned_away;
      }
    }
    CHECK(turned_away >= 2 * kMaxClients - 2);  // a scrape by the probe could hold a slot for a moment
    // A legitimate scrape meanwhile: refused at once (503), never left hanging. (-1: the
    // close reset the connection before the 503 was read; still at once.)
    const auto tb = Clock::now();
    HttpReply busy = Get(addr, "/metrics");
    CHECK((busy.status == 503 || busy.status == 200 || busy.status == -1));
    CHECK(MsSince(tb) <= Ms(2000));
    // Everything held is closed by the deadline, whatever the client does (here: nothing).
    const auto t0 = Clock::now();
    int closed = 0;
    for (int fd : silent) {
      bool eof = false;
      (void)ReadAll(fd, std::max(0, Ms(deadline_ms + 3000) - static_cast<int>(MsSince(t0))), &eof);
      closed += eof;
      ::close(fd);
    }
    CHECK(closed == static_cast<int>(silent.size()));
    CHECK(MsSince(t0) <= Ms(deadline_ms + 3000));
  }
  {
    // Trickle: a byte every 200 ms keeps an idle timeout happy forever; the deadline is not one.
    int fd = ConnectTcp(addr);
    REQUIRE(fd >= 0);
    const auto t0 = Clock::now();
    const std::string req = "GET /metrics HTTP/1.1\r\nX-Slow: ";
    bool eof = false;
    for (size_t i = 0; MsSince(t0) < Ms(deadline_ms + 3000) && !eof; ++i) {
      (void)::send(fd, i < req.size() ? &req[i] : "a", 1, MSG_NOSIGNAL);
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 200) == 1) {
        char buf[256];
        eof = ::read(fd, buf, sizeof buf) <= 0;
      }
    }
    CHECK(eof);
    CHECK(MsSince(t0) <= Ms(deadline_ms + 3000));
    ::close(fd);
  }
  // Oversized: a header block past 8 KiB, and a 1 MiB request line without a newline.
  {
    std::string big = "GET /metrics HTTP/1.1\r\n";
    while (big.size() < 16 * 1024) big += "X-Pad: " + std::string(100, 'a') + "\r\n";
    HttpReply r = Exchange(addr, big);
    CHECK(r.status == 431);
    HttpReply r2 = Exchange(addr, "GET /" + std::string(1 << 20, 'a'));
    CHECK((r2.status == 431 || r2.status == -1));  // -1: reset while we still sent, after the answer
  }
  // Not GET /metrics over HTTP/1.x: refused by name.
  {
    HttpReply post = Exchange(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
    CHECK(post.status == 405);
    CHECK(post.headers["allow"] == "GET");
    CHECK(Exchange(addr, "DELETE /metrics HTTP/1.0\r\n\r\n").status == 405);
    CHECK(Exchange(addr, "get /metrics HTTP/1.0\r\n\r\n").status == 405);
    CHECK(Get(addr, "/").status == 404);
    CHECK(Get(addr, "/metrics/../etc/passwd").status == 404);
    CHECK(Exchange(addr, "GET /metrics HTTP/2.0\r\n\r\n").status == 400);
    CHECK(Exchange(addr, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").status == 400);
    CHECK(Exchange(addr, std::string("\x16\x03\x01\x00\x05hello\r\n\r\n", 15)).status == 400);
    CHECK(Exchange(addr, "GET  /metrics HTTP/1.0\r\n\r\n").status == 400);
    CHECK(Exchange(addr, std::string("GET /met\0rics HTTP/1.0\r\n\r\n", 27)).status == 400);
  }
  // Many connections: two threads connect, send a request and hang up without reading,
  // as fast as they can, for a few seconds; the daemon's descriptors stay bounded.
  {
    std::atomic<bool> stop{false};
    std::atomic<int> made{0};
    std::vector<std::thread> ts;
    for (int t = 0; t < 2; ++t)
      ts.emplace_back([&] {
        while (!stop) {
          int fd = ConnectTcp(addr);
          if (fd < 0) continue;
          mgmt::SendAll(fd, "GET /metrics HTTP/1.0\r\n\r\n");
          ::close(fd);
          ++made;
        }
      });
    const auto t0 = Clock::now();
    while (MsSince(t0) < 3000) {
      fds_peak = std::max(fds_peak, OpenFds(d.pid()));
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    stop = true;
    for (auto& t : ts) t.join();
    // How many depends on the host's load (a full accept queue makes connect() retry its SYN
    // after a second); well past the server's bound is what matters.
    MESSAGE("many connections: ", made.load(), " made in 3 s");
    CHECK(made > 2 * kMaxClients);
  }
  // The daemon's descriptors: at most the client bound above what it had (plus the control
  // probe's clients and a worker's restart, which must not happen: checked below).
  INFO("daemon fds: before ", fds_before, ", peak ", fds_peak);
  CHECK(fds_peak <= fds_before + kMaxClients + 8);

  probe.Check(Ms(1000));
  CheckVictim(v.Stop());
  // The loop kept turning: every heartbeat answered, no worker killed or restarted.
  Exposition e;
  REQUIRE(WaitFor([&] { return (e = Scrape(addr)).error.empty(); }, Ms(10000)));
  for (const char* u : {kA, kB}) {
    INFO(u);
    CHECK(e.Get("vgpud_worker_state", {{"uuid", u}, {"state", "running"}}) == 1.0);
    CHECK(e.Get("vgpud_worker_restarts_total", {{"uuid", u}}) == 0.0);
  }
  // Each refusal counted by its name.
  for (const char* reason : {"too_many_clients", "deadline", "too_large", "bad_request", "method", "not_found"}) {
    INFO(reason);
    CHECK(e.Get("vgpud_metrics_rejected_total", {{"reason", reason}}).value_or(0) >= 1);
  }
  CHECK(d.Shutdown() == 0);
}

// ---- the real Prometheus -------------------------------------------------------------------------

namespace {

uint16_t FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    if (fd >= 0) ::close(fd);
    return 0;
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

std::string UrlEncode(std::string_view s) {
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') out += static_cast<char>(c);
    else out += fmt::format("%{:02X}", c);
  }
  return out;
}

// A prometheus server of our own: its config, its storage and its port in a temp dir; killed
// and reaped when the test ends, whatever happens.
class Prometheus {
 public:
  Prometheus(const std::string& binary, const std::string& target) {
    dir_ = fs::temp_directory_path() / fmt::format("vgpud-prometheus-{}", ::getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "data");
    std::ofstream(dir_ / "prometheus.yml") << "global:\n"
                                              "  scrape_interval: 1s\n"
                                              "  scrape_timeout: 1s\n"
                                              "  evaluation_interval: 1s\n"
                                              "scrape_configs:\n"
                                              "  - job_name: vgpud\n"
                                              "    metrics_path: /metrics\n"
                                              "    static_configs:\n"
                                              "      - targets: ['"
                                           << target << "']\n";
    port_ = FreePort();
    REQUIRE(port_ != 0);
    addr_ = fmt::format("127.0.0.1:{}", port_);
    const std::vector<std::string> argv = {binary,
                                           "--config.file=" + (dir_ / "prometheus.yml").string(),
                                           "--storage.tsdb.path=" + (dir_ / "data").string(),
                                           "--web.listen-address=" + addr_,
                                           "--log.level=info"};
    const std::string log = (dir_ / "prometheus.log").string();
    pid_ = ::fork();
    if (pid_ == 0) {
      int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::setpgid(0, 0);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execv(args[0], args.data());
      ::_exit(127);
    }
  }
  ~Prometheus() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      const auto deadline = Clock::now() + std::chrono::seconds(10);
      int st = 0;
      while (::waitpid(pid_, &st, WNOHANG) == 0) {
        if (Clock::now() > deadline) {
          ::kill(pid_, SIGKILL);
          ::waitpid(pid_, &st, 0);
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  bool Alive() const { return ::waitpid(pid_, nullptr, WNOHANG) == 0; }
  const std::string& addr() const { return addr_; }
  std::string Log() const { return mgmt::ReadFile(dir_ / "prometheus.log"); }
  // GET an API path; the parsed JSON body (null when none).
  Json Api(const std::string& target) const {
    HttpReply r = Get(addr_, target);
    return Json::parse(r.body, nullptr, false);
  }
  // The value of an instant query with exactly one series in its answer.
  std::optional<double> Query(const std::string& promql) const {
    Json j = Api("/api/v1/query?query=" + UrlEncode(promql));
    if (!j.is_object() || j.value("status", "") != "success") return std::nullopt;
    const Json& res = j["data"]["result"];
    if (!res.is_array() || res.size() != 1) return std::nullopt;
    const Json& v = res[0]["value"];
    if (!v.is_array() || v.size() != 2 || !v[1].is_string()) return std::nullopt;
    return std::strtod(v[1].get<std::string>().c_str(), nullptr);
  }

 private:
  fs::path dir_;
  uint16_t port_ = 0;
  std::string addr_;
  pid_t pid_ = -1;
};

}  // namespace

TEST_CASE("the real Prometheus scrapes the daemon and reads back the counts a workload produced") {
  // Debian's prometheus package (tools/install-deps.sh). Absent is a failure, not a skip:
  // `./run.sh test` installs it, and a skip would hide that the endpoint went unchecked.
  const std::string binary = mgmt::Env("PROMETHEUS", "/usr/bin/prometheus");
  REQUIRE_MESSAGE(::access(binary.c_str(), X_OK) == 0,
                  "no prometheus binary at ", binary, ": tools/install-deps.sh installs Debian's package");
  DaemonProc d;
  StartAB(d);
  const std::string addr = MetricsAddress(d);
  Prometheus prom(binary, addr);
  INFO("prometheus log:\n", prom.Log());
  REQUIRE_MESSAGE(WaitFor([&] { return !prom.Alive() || Get(prom.addr(), "/-/ready").status == 200; }, Ms(60000)),
                  "prometheus not ready:\n", prom.Log());
  REQUIRE(prom.Alive());

  // The counts: N kernels on A, one submission each, with the guest still connected (a
  // device reset would start `submissions` again at 0).
  constexpr uint32_t kRounds = 15;
  TestGuest g(d.Socket(kA));
  const uint64_t before = ShownCounter(d, kA, "submissions");
  for (uint32_t i = 0; i < kRounds; ++i) REQUIRE(RunOne(*g.drv, i).ok());
  const double want = static_cast<double>(before + kRounds);
  CHECK(ShownCounter(d, kA, "submissions") == before + kRounds);

  const std::string sel = fmt::format("{{job=\"vgpud\",uuid=\"{}\"}}", kA);
  std::optional<double> got;
  const bool seen = WaitFor(
      [&] {
        got = prom.Query("vgpud_submissions_total" + sel);
        return got == want;
      },
      Ms(30000));
  INFO("prometheus has ", got ? fmt::format("{}", *got) : std::string("nothing"), ", want ", want);
  CHECK(seen);
  CHECK(prom.Query("up{job=\"vgpud\"}") == 1.0);
  // The target's last scrape had no error (a malformed page would say so here).
  Json targets = prom.Api("/api/v1/targets");
  REQUIRE(targets.is_object());
  REQUIRE(targets["data"]["activeTargets"].size() == 1);
  const Json& t = targets["data"]["activeTargets"][0];
  CHECK(t["health"] == "up");
  CHECK(t["lastError"] == "");
  // Every counter of the channel's table reached Prometheus, for both vGPUs, under its name,
  // and the other series too.
  for (const ch::CounterName& c : ch::kCounterNames) {
    INFO(MetricName(c));
    CHECK(prom.Query(fmt::format("count({}{{job=\"vgpud\"}})", MetricName(c))) == 2.0);
  }
  CHECK(prom.Query(fmt::format("vgpud_worker_state{{uuid=\"{}\",state=\"running\"}}", kB)) == 1.0);
  CHECK(prom.Query("vgpud_vgpus_running") == 2.0);
  CHECK(prom.Query("vgpud_build_info") == 1.0);
  CHECK(prom.Query(fmt::format("vgpud_vfio_user_clients{{uuid=\"{}\"}}", kA)) == 1.0);
  // The values Prometheus holds are the daemon's own: the page's plans_executed for A.
  Exposition e = Scrape(addr);
  REQUIRE(e.error.empty());
  const auto plans = e.Get("vgpud_plans_executed_total", {{"uuid", kA}});
  REQUIRE(plans);
  CHECK(WaitFor([&] { return prom.Query("vgpud_plans_executed_total" + sel) == plans; }, Ms(10000)));
  CHECK(d.Shutdown() == 0);
}
