#pragma once
// The QEMU-under-qtest launcher and qtest client moved to guest/qemu_qtest.h, so that
// tools (vgpu-bench's mediated-qemu path, via guest/qtest_device.h) use the same code.
#include "guest/qemu_qtest.h"
