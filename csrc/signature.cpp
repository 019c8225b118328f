// The steady-state cache key of the public functions (peft_kernels/_op.py, `signature`), computed in C++: the
// Python version builds five attribute reads and a tuple per tensor, most of a small op's cached-path host time.
#ifdef TORCH_EXTENSION_NAME  // a Python extension module only (the CMake tooling build has no module)
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <string>

namespace peft_kernels {
namespace {

void put(std::string& buf, int64_t v) { buf.append(reinterpret_cast<const char*>(&v), sizeof v); }

// bytes encoding, for each argument, None as -1 or a strided tensor as: dim, sizes, strides, dtype, device type,
// device index, requires_grad (a prefix-free encoding: equal bytes <=> equal fields). None when an argument is
// neither (a subclass of Tensor, a sparse tensor, another type): the caller then takes its fully checked path.
PyObject* tensor_signature(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) try {
  std::string buf;
  buf.reserve(static_cast<size_t>(nargs) * 12 * sizeof(int64_t));
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    PyObject* o = args[i];
    if (o == Py_None) {
      put(buf, -1);
      continue;
    }
    if (!THPVariable_CheckExact(o)) Py_RETURN_NONE;  // subclasses may redefine shape or dtype
    const at::Tensor& t = THPVariable_Unpack(o);
    if (t.layout() != at::kStrided || t.is_nested()) Py_RETURN_NONE;
    const int64_t d = t.dim();
    put(buf, d);
    for (int64_t s : t.sizes()) put(buf, s);
    for (int64_t s : t.strides()) put(buf, s);
    put(buf, static_cast<int64_t>(t.scalar_type()));
    put(buf, static_cast<int64_t>(t.device().type()));
    put(buf, t.device().index());
    put(buf, t.requires_grad() ? 1 : 0);
  }
  return PyBytes_FromStringAndSize(buf.data(), static_cast<Py_ssize_t>(buf.size()));
} catch (...) {  // a tensor whose sizes or strides cannot be read (a functorch wrapper, ...): the checked path
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"tensor_signature", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(tensor_signature)),
     METH_FASTCALL, "steady-state cache key of tensors (None entries allowed), or None"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

void add_signature_function(PyObject* module) { PyModule_AddFunctions(module, methods); }

}  // namespace peft_kernels
#endif  // TORCH_EXTENSION_NAME
