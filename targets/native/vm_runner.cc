// Native runner of a qcompiler TVM artifact: loads model.so into the Relax VM on the CPU,
// calls "main" and writes the outputs.
//
//   vm_runner MODEL.so IO_DIR          one run: inputs and outputs in IO_DIR
//   vm_runner MODEL.so IO_DIR COUNT    COUNT runs: IO_DIR/0, IO_DIR/1, ... each as above
//
// An IO folder's inputs.txt has one line per input, "code bits ndim dim0 dim1 ..." (DLPack
// type code: 0 int, 1 uint, 2 float, 6 bool), with the raw little-endian data in inN.bin.
// The runner writes outputs.txt in the same format and outN.bin, and prints one line
// "run I MICROSECONDS" per call of main (wall time of the call alone) on stdout.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct HostAlloc {
  void AllocData(DLTensor* t) { t->data = std::calloc(ffi::GetDataSize(*t) + 1, 1); }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

size_t NumBytes(const DLTensor* t) { return ffi::GetDataSize(*t); }

std::vector<ffi::Tensor> ReadInputs(const std::string& dir) {
  std::ifstream spec(dir + "/inputs.txt");
  std::vector<ffi::Tensor> inputs;
  std::string line;
  while (std::getline(spec, line)) {
    if (line.empty()) continue;
    std::istringstream fields(line);
    int code, bits, ndim;
    fields >> code >> bits >> ndim;
    std::vector<int64_t> shape(ndim);
    for (auto& d : shape) fields >> d;
    DLDataType dtype{static_cast<uint8_t>(code), static_cast<uint8_t>(bits), 1};
    ffi::Tensor t = ffi::Tensor::FromNDAlloc(HostAlloc(), ffi::ShapeView(shape.data(), shape.size()), dtype,
                                             DLDevice{kDLCPU, 0});
    std::ifstream data(dir + "/in" + std::to_string(inputs.size()) + ".bin", std::ios::binary);
    data.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(NumBytes(t.GetDLTensorPtr())));
    if (!data) throw std::runtime_error("short input file " + std::to_string(inputs.size()));
    inputs.push_back(t);
  }
  return inputs;
}

void WriteOutput(const std::string& dir, size_t index, const ffi::Tensor& t, std::ofstream& spec) {
  const DLTensor* dl = t.GetDLTensorPtr();
  spec << int(dl->dtype.code) << ' ' << int(dl->dtype.bits) << ' ' << dl->ndim;
  for (int i = 0; i < dl->ndim; ++i) spec << ' ' << dl->shape[i];
  spec << '\n';
  std::ofstream data(dir + "/out" + std::to_string(index) + ".bin", std::ios::binary);
  data.write(static_cast<const char*>(dl->data) + dl->byte_offset, static_cast<std::streamsize>(NumBytes(dl)));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 && argc != 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.so IO_DIR [COUNT]\n";
    return 2;
  }
  try {
    std::string root = argv[2];
    int count = argc == 4 ? std::atoi(argv[3]) : 0;
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);  // pooled allocator
    ffi::Function main_fn = vm->GetFunction("main").value();
    for (int run = 0; run < (count > 0 ? count : 1); ++run) {
      std::string dir = count > 0 ? root + "/" + std::to_string(run) : root;
      std::vector<ffi::Tensor> inputs = ReadInputs(dir);
      std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
      ffi::Any result;
      auto start = std::chrono::steady_clock::now();
      main_fn.CallPacked(args.data(), static_cast<int>(args.size()), &result);
      auto micros = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - start);
      std::cout << "run " << run << ' ' << micros.count() << '\n';
      auto outputs = result.cast<ffi::Array<ffi::Any>>();
      std::ofstream spec(dir + "/outputs.txt");
      for (size_t i = 0; i < outputs.size(); ++i) WriteOutput(dir, i, outputs[i].cast<ffi::Tensor>(), spec);
    }
  } catch (const std::exception& err) {
    std::cerr << "vm_runner: " << err.what() << "\n";
    return 1;
  }
  return 0;
}
