// One schema per native op of the peft_kernels namespace. Implementations register per dispatch key:
// csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu (CUDA), csrc/*.cpp (compositions of ATen calls and the above).
#include <torch/library.h>

#include <string>

#ifdef TORCH_EXTENSION_NAME
#include <torch/extension.h>

#include "peft_kernels/distill.h"
#include "peft_kernels/adapter.h"
#include "peft_kernels/bias_norm.h"
#include "peft_kernels/lora.h"
#include "peft_kernels/prefix.h"
#include "peft_kernels/prompt.h"

namespace peft_kernels {
void add_signature_function(PyObject* module);  // csrc/signature.cpp
}
#endif

TORCH_LIBRARY(peft_kernels, m) {
  // Dropout with the library's Philox mask (see include/peft_kernels/philox.h):
  //   out = x * keep(seed, i*K + j) / (1 - p)
  m.def("philox_dropout(Tensor x, float p, int seed) -> Tensor");
  //   out += keep(seed, i*K + j) / (1 - p) * src   (the mask regenerated in a backward epilogue)
  m.def("philox_dropout_add_(Tensor(a!) out, Tensor src, float p, int seed) -> ()");  // in place, no return
  // Column sum of a 2-D tensor with fp32 accumulation (the bias gradient): out[j] = sum_i x[i, j].
  m.def("column_sum(Tensor x, ScalarType? out_dtype=None) -> Tensor");

  // LoRA linear: y = x W^T + b + s * (drop(x) A^T) B^T. Returns (y, S = drop(x) A^T).
  m.def(
      "lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p, int seed) -> (Tensor, Tensor)");
  // Returns (dx, dW, db, dA, dB); an entry not asked for in `needs` comes back undefined (None).
  m.def(
      "lora_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor S, "
      "float scaling, float dropout_p, int seed, bool[5] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // BitFit: y = x W^T + b with W frozen. Backward returns (dx, db) (either undefined when not needed).
  m.def("bias_only_linear_fwd(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  // db comes back in db_dtype (the bias's own dtype, e.g. an fp32 master bias), summed in fp32 (fp64 for fp64).
  m.def("bias_only_linear_bwd(Tensor dy, Tensor weight, bool[2] needs, ScalarType? db_dtype=None) -> (Tensor, Tensor)");
  // The same on CUDA (csrc/cuda/bias_only.cu): the deterministic column sum on a side stream beside the cuBLAS dx GEMM.
  m.def(
      "bias_only_linear_bwd_cuda(Tensor dy, Tensor weight, bool[2] needs, ScalarType? db_dtype=None) -> "
      "(Tensor, Tensor)");

  // Prefix attention's prefix part merged into an attention over the real keys (csrc/cuda/prefix_merge.cu; CUDA only).
  // prefix is [Hkv, P, D] (shared) or [B, Hkv, P, D], any float dtype; GQA. Forward: merges the P prefix keys into
  // (out, lse_c) by log-sum-exp, out written in place; returns the merged lse [B, Hq, Lq] fp32 (natural log; lse_c
  // is -inf in rows that see no real key). Backward, given the merged out and lse: adds the prefix part's dQ into
  // dq in place; returns (dprefix_k, dprefix_v) in fp32, shaped like the prefix (batch-summed when shared).
  m.def(
      "prefix_merge_fwd_cuda(Tensor q, Tensor prefix_k, Tensor prefix_v, Tensor(a!) out, Tensor lse_c, float scale) "
      "-> Tensor");
  m.def(
      "prefix_merge_bwd_cuda(Tensor dout, Tensor q, Tensor prefix_k, Tensor prefix_v, Tensor out, Tensor lse, "
      "Tensor(a!) dq, float scale) -> (Tensor, Tensor)");

  // Soft-prompt embedding (csrc/cuda/prompt.cu; CUDA only): out [B, P + S, H] in weight's dtype, each row either
  // weight[input_ids[b, s]] or prompt[(b,) p], from slots [1 or B, P + S] int32 (s >= 0 token, -(p + 1) virtual)
  // or, without slots, the prompt in front. Backward returns the prompt's gradient only ([P, H] summed over the
  // batch in fp32, or [B, P, H]), read at vpos [1 or B, P] int32 (None: the first P rows).
  m.def("soft_prompt_embed_fwd_cuda(Tensor input_ids, Tensor weight, Tensor prompt, Tensor? slots) -> Tensor");
  m.def(
      "soft_prompt_embed_bwd_cuda(Tensor dout, Tensor? vpos, int num_prompt, bool batched, ScalarType prompt_dtype) "
      "-> Tensor");

  // Distillation loss, row-wise (csrc/cuda/distill.cu; CUDA only): per-row losses [N] fp32 of
  // w_kd T^2 D(t, s; T) + w_ce CE(s, label) (divergence 0 forward KL, 1 reverse KL, 2 JSD(beta)), each term
  // divided by counts = (n_kd, n_ce) when mean; d(loss)/ds written into grad_out when given (it may be s).
  m.def(
      "distill_loss_fwd_cuda(Tensor s, Tensor t, Tensor? labels, Tensor? kd_mask, Tensor counts, Tensor(a!)? grad_out, "
      "float temperature, float w_kd, float w_ce, int ignore_index, bool mean, int divergence, float beta) -> Tensor");
  // ds *= dloss in place (one fp32 value, or one per row).
  m.def("distill_scale_grad_cuda_(Tensor(a!) ds, Tensor dloss) -> ()");

  // Bottleneck adapter (csrc/cuda/adapter.cu; CUDA only): y = [h +] s (act(h W_downᵀ + b_down) W_upᵀ + b_up).
  // Returns (y, z = h W_downᵀ + b_down); activation 0 relu, 1 gelu, 2 gelu_tanh, 3 silu, 4 tanh, 5 identity.
  m.def(
      "bottleneck_adapter_fwd_cuda(Tensor h, Tensor W_down, Tensor? b_down, Tensor W_up, Tensor? b_up, int activation, "
      "float scaling, bool residual) -> (Tensor, Tensor)");
  // Returns (dh, dW_down, db_down, dW_up, db_up), each weight's gradient in its dtype; undefined where not needed.
  m.def(
      "bottleneck_adapter_bwd_cuda(Tensor dy, Tensor h, Tensor W_down, Tensor? b_down, Tensor W_up, Tensor? b_up, "
      "Tensor z, int activation, float scaling, bool residual, bool[5] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Which device kernels this build carries: "cpu" or "cpu,cuda".
  m.def("build_info() -> str", []() -> std::string {
#ifdef PEFT_KERNELS_WITH_CUDA
    return "cpu,cuda";
#else
    return "cpu";
#endif
  });
}

#ifdef TORCH_EXTENSION_NAME
// An importable Python module, so `import peft_kernels._C` runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peft_kernels native ops (registered under torch.ops.peft_kernels)";
  // Eager-mode autograd nodes called directly (not through torch.ops: its Python dispatch is most of a small
  // layer's host time). torch.compile traces the custom ops instead.
  m.def("lora_linear_autograd", &peft_kernels::lora_linear_autograd, "LoRA linear as one C++ autograd node");
  m.def("bottleneck_adapter_autograd", &peft_kernels::bottleneck_adapter_autograd,
        "the bottleneck adapter reference math as one C++ autograd node");
  m.def("bias_rms_norm_autograd", &peft_kernels::bias_rms_norm_autograd,
        "the bias-only RMSNorm reference math as one C++ autograd node");
  // Distillation loss on CPU tensors (csrc/distill.cpp): the `cpp` backend's forward -> (loss, ds), and the same
  // as one autograd node. Not torch ops: the family's custom ops wrap the forward for torch.compile.
  m.def("distill_loss_forward_cpu", &peft_kernels::distill_loss_forward_cpu, "distillation loss forward (CPU)");
  m.def("distill_loss_autograd", &peft_kernels::distill_loss_autograd, "distillation loss as one autograd node");
  // Soft-prompt embedding on CPU tensors (csrc/prompt.cpp): the `cpp` backend's forward, and it as one autograd node.
  m.def("soft_prompt_embed_forward_cpu", &peft_kernels::soft_prompt_embed_forward_cpu, "soft prompt embed (CPU)");
  m.def("soft_prompt_embed_autograd", &peft_kernels::soft_prompt_embed_autograd, "soft prompt embed autograd node");
  // Prefix attention over concatenated keys on CPU tensors, no mask (csrc/prefix.cpp): the `concat` backend's node.
  m.def("prefix_concat_attention_autograd", &peft_kernels::prefix_concat_attention_autograd,
        "prefix attention over [prefix; k] (CPU, no mask) as one autograd node");
  // The public functions' steady-state cache key (METH_FASTCALL: a pybind11 call costs more than the key).
  peft_kernels::add_signature_function(m.ptr());
}
#endif
