#pragma once
// Public header of base/: Result<T> and named errors, strong address types, RAII owners, logging.
#include "base/fd.h"
#include "base/log.h"
#include "base/result.h"
#include "base/types.h"
