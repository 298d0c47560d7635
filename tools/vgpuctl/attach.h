#pragma once
// What attaches a running vGPU to a VM: QEMU options and the libvirt domain XML snippet.
// Pure formatting, so tests check it without a daemon.

#include <string>
#include <vector>

namespace vg::vgpuctl {

struct AttachSpec {
  std::string uuid;
  std::string socket;          // the vGPU's vfio-user socket
  std::string memory = "4G";   // guest RAM size: the shared memfd backend must match -m
};

// argv elements (unquoted): -object memory-backend-memfd,... -machine memory-backend=...
// -device {"driver":"vfio-user-pci","socket":{"path":...,"type":"unix"}}
std::vector<std::string> QemuArgs(const AttachSpec& s);
// One line a shell takes back as the same argv (single quotes where needed).
std::string ShellJoin(const std::vector<std::string>& args);
// <memoryBacking> (memfd, shared) plus <qemu:commandline> with the -device argument.
std::string DomXml(const AttachSpec& s);

}  // namespace vg::vgpuctl
