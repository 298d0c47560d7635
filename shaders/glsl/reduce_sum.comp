#version 450
#extension GL_GOOGLE_include_directive : require
// out[0] += sum(in[0..count)) in u32 (wrapping), so results are exact and order-free.
// Grid-stride: every element is summed whatever the group count (>= 1), so a caller can
// dispatch a few groups for a large input and amortise the shared-memory tree.
layout(local_size_x = 256) in;
#include "common.glsl"
layout(std430, binding = 0) readonly buffer In { uint src[]; };
layout(std430, binding = 1) buffer Out { uint total[]; };
layout(push_constant) uniform Push { uint count; } pc;
shared uint part[256];
void main() {
  uint stride = gl_NumWorkGroups.x * gl_WorkGroupSize.x * gl_NumWorkGroups.y;
  uint acc = 0u;
  for (uint i = LinearIndex(); i < pc.count; i += stride) {
    acc += src[i];
    if (pc.count - i <= stride) break;  // i + stride would pass count (or wrap)
  }
  uint l = gl_LocalInvocationID.x;
  part[l] = acc;
  barrier();
  for (uint s = 128; s > 0; s >>= 1) {
    if (l < s) part[l] += part[l + s];
    barrier();
  }
  if (l == 0 && part[0] != 0u) atomicAdd(total[0], part[0]);
}
