#include "tools/vgpuctl/attach.h"

#include <cctype>
#include <string_view>

#include <nlohmann/json.hpp>

namespace vg::vgpuctl {
namespace {

std::string DeviceId(const AttachSpec& s) { return "vgpu-" + s.uuid.substr(0, 8); }

std::string DeviceJson(const AttachSpec& s) {
  nlohmann::ordered_json d;
  d["driver"] = "vfio-user-pci";
  d["id"] = DeviceId(s);
  d["socket"] = {{"path", s.socket}, {"type", "unix"}};
  return d.dump();
}

std::string XmlAttr(const std::string& v) {
  std::string out;
  for (char c : v) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '\'': out += "&apos;"; break;
      default: out += c;
    }
  }
  return out;
}

}  // namespace

std::vector<std::string> QemuArgs(const AttachSpec& s) {
  // vfio-user DMA needs guest RAM the daemon can map: a shared memfd backend, as for
  // vhost-user. The vfio-user-pci device takes the socket in QEMU's JSON -device syntax.
  return {"-m",       s.memory,
          "-object",  "memory-backend-memfd,id=vgpud-ram,size=" + s.memory + ",share=on",
          "-machine", "memory-backend=vgpud-ram",
          "-device",  DeviceJson(s)};
}

std::string ShellJoin(const std::vector<std::string>& args) {
  std::string out;
  for (const std::string& a : args) {
    if (!out.empty()) out += ' ';
    bool plain = !a.empty();
    for (char c : a)
      if (!(isalnum(static_cast<unsigned char>(c)) || std::string_view("-_=,./:+@").find(c) != std::string_view::npos))
        plain = false;
    if (plain) {
      out += a;
      continue;
    }
    out += '\'';
    for (char c : a) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    out += '\'';
  }
  return out;
}

std::string DomXml(const AttachSpec& s) {
  std::string x;
  x += "<!-- vGPU " + s.uuid + " served by vgpud over vfio-user.\n";
  x += "     1. Declare the QEMU namespace on the root element:\n";
  x += "        <domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n";
  x += "     2. Put <memoryBacking> under <domain>: guest RAM must be shared memory (memfd) the\n";
  x += "        daemon can map for DMA; without it the device cannot reach guest memory.\n";
  x += "     3. Put <qemu:commandline> under <domain>. The socket must be reachable by the\n";
  x += "        QEMU process (user, group and any sandbox such as AppArmor or SELinux). -->\n";
  x += "<memoryBacking>\n";
  x += "  <source type='memfd'/>\n";
  x += "  <access mode='shared'/>\n";
  x += "</memoryBacking>\n";
  x += "<qemu:commandline>\n";
  x += "  <qemu:arg value='-device'/>\n";
  x += "  <qemu:arg value='" + XmlAttr(DeviceJson(s)) + "'/>\n";
  x += "</qemu:commandline>\n";
  return x;
}

}  // namespace vg::vgpuctl
