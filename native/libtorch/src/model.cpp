// The two artifact formats the native runtime runs: TorchScript (torch::jit::load) and
// AOTInductor packages (.pt2, AOTIModelPackageLoader). Both take (N, 3, H, W) uint8 and return
// (N, K) float32 probabilities: normalisation and softmax are folded into the graph.
// Both load from the bytes whose sha256 was checked (read_checked_artifact), never from the path again.
#include <stdlib.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/headeronly/version.h>
#include <torch/script.h>

#include "internal.h"

namespace classify {
namespace {
namespace fs = std::filesystem;

// AOTIModelPackageLoader only takes a path: the checked bytes go to a private directory (mkdtemp,
// mode 0700) that no other user can write, and it is removed once the package is loaded.
class PrivateCopy {
 public:
  PrivateCopy(const std::string& bytes, const std::string& label) {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = (fs::path(tmp && *tmp ? tmp : "/tmp") / "classify-XXXXXX").string();
    if (!mkdtemp(templ.data())) throw BundleError(label + ": cannot create a private temporary folder to load it from");
    dir_ = templ;
    path_ = (fs::path(dir_) / "model.pt2").string();
    std::ofstream out(path_, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out.flush()) throw BundleError(label + ": cannot write a private copy to " + path_ + " (disk full?)");
  }
  ~PrivateCopy() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string dir_, path_;
};

// The running CPU's feature flags as /proc/cpuinfo names them (the names the manifest records);
// nullptr where that file cannot be read.
const std::set<std::string>* cpu_features() {
  static const std::optional<std::set<std::string>> flags = []() -> std::optional<std::set<std::string>> {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line)) {
      const size_t colon = line.find(':');
      if (line.rfind("flags", 0) != 0 || colon == std::string::npos) continue;
      std::istringstream words(line.substr(colon + 1));
      std::set<std::string> out;
      for (std::string f; words >> f;) out.insert(f);
      return out;
    }
    return std::nullopt;
  }();
  return flags ? &*flags : nullptr;
}

std::string machine() {
  utsname u{};
  return uname(&u) == 0 ? std::string(u.machine) : std::string();
}

std::string major_minor(const std::string& version) {  // "2.14.1+cu130" -> "2.14"
  const std::string v = version.substr(0, version.find('+'));
  const size_t first = v.find('.');
  return first == std::string::npos ? v : v.substr(0, v.find('.', first + 1));
}

class TorchScriptModel : public Model {
 public:
  TorchScriptModel(const std::string& bytes, const std::string& path, const torch::Device& device) {
    try {
      std::istringstream in(bytes);
      module_ = torch::jit::load(in, device);
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

// A .pt2 package holds the dynamic-batch model "model" and, per the manifest, models compiled for one
// exact batch size (static shapes let inductor prepack the convolution weights: faster at that size).
class Pt2Model : public Model {
 public:
  Pt2Model(const std::string& bytes, const std::string& label, const Artifact& artifact, const torch::Device& device) {
    PrivateCopy copy(bytes, label);
    dynamic_ = open(copy.path(), label, "model", device);
    for (const auto& [n, name] : artifact.static_batch_models) static_[n] = open(copy.path(), label, name, device);
  }
  torch::Tensor run(const torch::Tensor& images) override {
    auto it = static_.find(images.size(0));
    auto& loader = it == static_.end() ? dynamic_ : it->second;
    std::vector<torch::Tensor> out = loader->run({images});
    return out.at(0);
  }

 private:
  using Loader = torch::inductor::AOTIModelPackageLoader;
  static std::unique_ptr<Loader> open(const std::string& path, const std::string& label, const std::string& name,
                                      const torch::Device& device) {
    try {
      return std::make_unique<Loader>(path, name, false, 1,
                                      device.is_cuda() ? std::max<c10::DeviceIndex>(device.index(), 0) : -1);
    } catch (const std::exception& e) {
      throw BundleError(label + ": cannot load model '" + name + "' of the AOTInductor package (" +
                        std::string(e.what()).substr(0, 400) +
                        "); it must be compiled for this device and torch version, or use --format torchscript");
    }
  }
  std::unique_ptr<Loader> dynamic_;
  std::map<int64_t, std::unique_ptr<Loader>> static_;
};

}  // namespace

std::string pt2_problem(const Bundle& b, const Artifact& a) {
  if (a.format != "aotinductor" || a.device != "cpu" || a.cpu_isa.empty()) return "";
  const std::string name = (std::filesystem::path(b.dir) / a.file).string();
  const std::string here = machine();
  std::string reason;
  if (!a.machine.empty() && !here.empty() && a.machine != here) {
    reason = name + " was compiled for " + a.machine + " CPUs, this one is " + here;
  } else if (const std::set<std::string>* have = cpu_features()) {
    std::string missing;
    std::set<std::string> wanted(a.cpu_features.begin(), a.cpu_features.end());
    for (const std::string& f : wanted)
      if (!have->count(f)) missing += (missing.empty() ? "" : ", ") + f;
    if (!missing.empty())
      reason = name + " was compiled for " + a.cpu_isa + " CPUs (-march=" + a.march + "); this CPU lacks " + missing +
               " and would stop with an illegal instruction";
  }
  const std::string ours = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
  if (reason.empty() && !a.torch_version.empty() && major_minor(a.torch_version) != ours)
    reason = name + " was compiled with torch " + a.torch_version + "; this runtime was built against torch " + ours +
             "." + std::to_string(TORCH_VERSION_PATCH) +
             ", and AOTInductor packages only load in the torch release that built them";
  if (reason.empty()) return "";
  return reason + "; recompile it on this machine with 'python -m export recompile " + b.dir +
         "' (or use the TorchScript artifact: --format torchscript)";
}

std::unique_ptr<Model> load_model(const std::string& bytes, const std::string& label, const Artifact& artifact,
                                  const torch::Device& device) {
  if (artifact.format == "torchscript") return std::make_unique<TorchScriptModel>(bytes, label, device);
  if (artifact.format == "aotinductor") return std::make_unique<Pt2Model>(bytes, label, artifact, device);
  throw OptionError("artifact '" + artifact.key + "' has format '" + artifact.format + "'; use pt2 or torchscript");
}

}  // namespace classify
