#pragma once
// Public header of guest/: the device library (vfio-user client + mmaps + IRQs).
#include "guest/device.h"
