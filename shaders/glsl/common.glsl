// Shared by the 1-D kernels: the element index of this invocation. Group counts may use
// y as well as x so one dispatch can cover more than 65535 groups' worth of elements
// (maxComputeWorkGroupCount[0] is only guaranteed to be 65535).
uint LinearIndex() {
  return gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * (gl_NumWorkGroups.x * gl_WorkGroupSize.x);
}
