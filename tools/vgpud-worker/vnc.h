#pragma once
// F10: the VNC console of one vGPU (docs/management.md "Display"): libvncserver on the
// listening socket the supervisor created (fd 8, loopback by default), serving the plane the
// guest scans out. libvncserver runs in threads of its own (a listener, and per client an
// input and an output thread), so a slow or hostile VNC client blocks only them, never the
// worker's event loop; the loop only copies the frame in, at most 10 times a second and only
// while a client is connected.
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "base/base.h"
#include "mediator/mediator.h"

typedef struct _rfbScreenInfo* rfbScreenInfoPtr;
struct _rfbClientRec;

namespace vg::worker {

class VncConsole {
 public:
  // `password`: at most 8 bytes (VNC authentication's limit); empty: no authentication.
  static Result<std::unique_ptr<VncConsole>> Create(int listen_fd, const std::string& password,
                                                    const mediator::Vgpu& vgpu);
  ~VncConsole();
  VncConsole(const VncConsole&) = delete;
  VncConsole& operator=(const VncConsole&) = delete;

  // On the loop's refresh timer: the current frame into the framebuffer, clients told.
  void Refresh() { Update(false); }

 private:
  explicit VncConsole(const mediator::Vgpu& vgpu) : vgpu_(vgpu) {}
  // `connecting`: from libvncserver's listener thread as a client connects, so that its
  // first frame (and the size it is told) is the current one, not the last refresh's.
  void Update(bool connecting);
  static int OnNewClient(_rfbClientRec* cl);

  const mediator::Vgpu& vgpu_;
  std::mutex mu_;  // the framebuffer: the loop's refresh and a connecting client's
  rfbScreenInfoPtr screen_ = nullptr;
  std::string password_;
  std::vector<char*> passwords_;  // libvncserver's NULL-terminated list
  // The framebuffer clients read, and the one before a resize (their threads may still read
  // it until their next update: kept one generation).
  std::vector<char> fb_, old_fb_;
  uint32_t width_ = 0, height_ = 0;
  uint64_t shown_flips_ = ~0ull;
};

}  // namespace vg::worker
