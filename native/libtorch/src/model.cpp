// The two artifact formats the native runtime runs: TorchScript (torch::jit::load) and
// AOTInductor packages (.pt2, AOTIModelPackageLoader). Both take (N, 3, H, W) uint8 and return
// (N, K) float32 probabilities: normalisation and softmax are folded into the graph.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include "internal.h"

namespace classify {
namespace {

class TorchScriptModel : public Model {
 public:
  TorchScriptModel(const std::string& path, const torch::Device& device) {
    try {
      module_ = torch::jit::load(path, device);
    } catch (const c10::Error& e) {
      throw BundleError(path + ": cannot load TorchScript (" + e.what_without_backtrace() +
                        "); re-export the bundle with this torch version");
    }
    module_.eval();
  }
  torch::Tensor run(const torch::Tensor& images) override {
    return module_.forward({images}).toTensor();
  }

 private:
  torch::jit::Module module_;
};

class Pt2Model : public Model {
 public:
  Pt2Model(const std::string& path, const torch::Device& device) {
    try {
      loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
          path, "model", false, 1, device.is_cuda() ? std::max<c10::DeviceIndex>(device.index(), 0) : -1);
    } catch (const std::exception& e) {
      throw BundleError(path + ": cannot load the AOTInductor package (" + std::string(e.what()).substr(0, 400) +
                        "); it must be compiled for this device and torch version, or use --format torchscript");
    }
  }
  torch::Tensor run(const torch::Tensor& images) override {
    std::vector<torch::Tensor> out = loader_->run({images});
    return out.at(0);
  }

 private:
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
};

}  // namespace

std::unique_ptr<Model> load_model(const std::string& path, const std::string& format, const torch::Device& device) {
  if (format == "torchscript") return std::make_unique<TorchScriptModel>(path, device);
  if (format == "pt2") return std::make_unique<Pt2Model>(path, device);
  throw OptionError("unknown format '" + format + "'; use pt2 or torchscript");
}

}  // namespace classify
