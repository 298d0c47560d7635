#pragma once
// Public header of guest/: the device library (vfio-user client + mmaps + IRQs) and the
// driver API of the mediated path (GTT-mapped buffers, ring, commands, fences), and its
// three backends: Device (vfio-user), PciDevice (in a VM), QtestDevice (QEMU under qtest).
#include "guest/backend.h"
#include "guest/device.h"
#include "guest/driver.h"
#include "guest/pci_device.h"
#include "guest/qtest_device.h"
