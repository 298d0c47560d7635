#pragma once
// Public header of vfio_user/: the vfio-user protocol shared by the vgpud server and the
// guest client (QEMU docs/interop/vfio-user.rst).
#include "vfio_user/client.h"
#include "vfio_user/device.h"
#include "vfio_user/dma.h"
#include "vfio_user/irqs.h"
#include "vfio_user/messages.h"
#include "vfio_user/server.h"
#include "vfio_user/transport.h"
