#include "tools/vgpud-worker/vnc.h"

#include <rfb/rfb.h>

#include <cstring>

#include "abi/device.h"

namespace vg::worker {

namespace {
constexpr uint32_t kIdleWidth = 640, kIdleHeight = 480;  // black, while nothing is scanned out

// 32 bpp, memory order B, G, R, X: the guest's XRGB8888 as it lies in the aperture.
void SetFormat(rfbScreenInfoPtr s) {
  s->serverFormat.redShift = 16;
  s->serverFormat.greenShift = 8;
  s->serverFormat.blueShift = 0;
}
}  // namespace

Result<std::unique_ptr<VncConsole>> VncConsole::Create(int listen_fd, const std::string& password,
                                                        const mediator::Vgpu& vgpu) {
  std::unique_ptr<VncConsole> c(new VncConsole(vgpu));
  c->width_ = kIdleWidth;
  c->height_ = kIdleHeight;
  c->fb_.assign(size_t{kIdleWidth} * kIdleHeight * 4, 0);
  int argc = 0;
  c->screen_ = rfbGetScreen(&argc, nullptr, static_cast<int>(kIdleWidth), static_cast<int>(kIdleHeight), 8, 3, 4);
  VG_ERROR_IF(!c->screen_, Errc::kOutOfMemory, "rfbGetScreen failed");
  rfbScreenInfoPtr s = c->screen_;
  SetFormat(s);
  s->frameBuffer = c->fb_.data();
  s->desktopName = "vgpud";
  s->alwaysShared = TRUE;
  // The socket is the supervisor's, already listening: libvncserver must not open one (the
  // sandbox refuses socket/bind/listen), so it is handed over as "sockets ready".
  s->autoPort = FALSE;
  s->port = 0;
  s->ipv6port = 0;
  s->listenSock = listen_fd;
  s->maxFd = listen_fd;
  FD_ZERO(&s->allFds);
  FD_SET(listen_fd, &s->allFds);
  s->socketState = RFB_SOCKET_READY;
  if (!password.empty()) {
    c->password_ = password.substr(0, 8);
    c->passwords_ = {c->password_.data(), nullptr};
    s->authPasswdData = c->passwords_.data();
    s->passwordCheck = rfbCheckPasswordByList;
  }
  s->screenData = c.get();
  s->newClientHook = [](rfbClientPtr cl) { return static_cast<rfbNewClientAction>(VncConsole::OnNewClient(cl)); };
  rfbInitServer(s);
  rfbRunEventLoop(s, -1, TRUE);  // its own threads: never the worker's loop
  return c;
}

VncConsole::~VncConsole() {
  if (!screen_) return;
  rfbShutdownServer(screen_, TRUE);
  rfbScreenCleanup(screen_);
}

int VncConsole::OnNewClient(rfbClientPtr cl) {
  static_cast<VncConsole*>(cl->screen->screenData)->Update(true);
  return RFB_CLIENT_ACCEPT;
}

void VncConsole::Update(bool connecting) {
  std::lock_guard lk(mu_);
  if (!connecting && !screen_->clientHead) return;  // nobody looks: no copy
  Result<mediator::ScanoutFrame> f = vgpu_.CaptureScanout();
  uint32_t w = kIdleWidth, h = kIdleHeight;
  if (f.ok()) {
    w = f->width;
    h = f->height;
  }
  if (w != width_ || h != height_) {
    old_fb_ = std::move(fb_);
    fb_.assign(size_t{w} * h * 4, 0);
    width_ = w;
    height_ = h;
    rfbNewFramebuffer(screen_, fb_.data(), static_cast<int>(w), static_cast<int>(h), 8, 3, 4);
    SetFormat(screen_);
    shown_flips_ = ~0ull;
  }
  if (!f.ok()) {
    if (shown_flips_ != 0) {
      std::memset(fb_.data(), 0, fb_.size());
      rfbMarkRectAsModified(screen_, 0, 0, static_cast<int>(w), static_cast<int>(h));
      shown_flips_ = 0;
    }
    return;
  }
  // Copied whatever the flip count: a guest may draw into the buffer it scans out.
  const uint8_t* src = f->pixels.data();
  auto* dst = reinterpret_cast<uint8_t*>(fb_.data());
  const size_t n = size_t{w} * h;
  switch (f->format) {
    case abi::display::kFormatXrgb8888:
    case abi::display::kFormatArgb8888:
      std::memcpy(dst, src, n * 4);
      break;
    case abi::display::kFormatRgb565:
      for (size_t i = 0; i < n; ++i) {
        const uint32_t p = src[2 * i] | src[2 * i + 1] << 8;
        const uint32_t r = p >> 11, g = (p >> 5) & 0x3F, b = p & 0x1F;
        dst[4 * i + 0] = static_cast<uint8_t>(b << 3 | b >> 2);
        dst[4 * i + 1] = static_cast<uint8_t>(g << 2 | g >> 4);
        dst[4 * i + 2] = static_cast<uint8_t>(r << 3 | r >> 2);
        dst[4 * i + 3] = 0;
      }
      break;
    default:
      return;
  }
  shown_flips_ = f->flips + 1;
  rfbMarkRectAsModified(screen_, 0, 0, static_cast<int>(w), static_cast<int>(h));
}

}  // namespace vg::worker
