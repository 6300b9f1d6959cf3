// Element-type tags shared by the kernels, their launchers and the torch binding.
//
// The kernels move 16-bit elements as raw bits (uint16_t); a tag only selects the tensor-core
// instruction and the float conversions. Plain C++: no CUDA or torch headers.
#pragma once

namespace l2vf {

struct Fp16 {};  // IEEE half precision
struct Bf16 {};  // bfloat16

}  // namespace l2vf
