#version 450
#extension GL_GOOGLE_include_directive : require
layout(local_size_x = 256) in;
#include "common.glsl"
layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) buffer Y { float y[]; };
layout(push_constant) uniform Push { uint count; float a; } pc;
void main() {
  uint i = LinearIndex();
  if (i < pc.count) y[i] = pc.a * x[i] + y[i];
}
