#version 450
#extension GL_GOOGLE_include_directive : require
layout(local_size_x = 256) in;
#include "common.glsl"
layout(std430, binding = 0) writeonly buffer Dst { uint dst[]; };
layout(push_constant) uniform Push { uint count; uint value; } pc;
void main() {
  uint i = LinearIndex();
  if (i < pc.count) dst[i] = pc.value;
}
