// lwi_host: a C++ host running the whole method through liblwi.so —
//   init-train → fine-tune → segment — with progress from the callback and Ctrl-C cancelling cleanly.
// usage: lwi_host --dataset D.json --arch ARCH.json --init-config I.json --tune-config T.json
//                 --work DIR [--init-epochs N] [--tune-epochs N] [--device D] IMAGE...
// Exit codes: 0 done, 1 failure, 2 usage, 130 cancelled by Ctrl-C.
#include <atomic>
#include <csignal>
#include <filesystem>
#include <malloc.h>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "lwi.hpp"

static std::atomic<bool> interrupted{false};

static std::string read_file(const std::string &path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot read " + path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

/// {"dataset": …, "out": …, "arch": ARCH, "epochs": N, <the fields of the stage's config file>}:
/// the config file is a JSON object; its members are spliced after ours (no JSON library needed).
static std::string stage_config(const std::string &dataset, const std::string &out, const std::string &arch,
                                int epochs, const std::string &extra_file, const std::string &more = "") {
  std::string extra = read_file(extra_file);
  auto open = extra.find('{');
  if (open == std::string::npos) throw std::runtime_error(extra_file + " is not a JSON object");
  std::string rest = extra.substr(open + 1);
  bool empty = rest.find_first_not_of(" \t\r\n}") == std::string::npos;
  return "{\"dataset\": " + lwi::json_string(dataset) + ", \"out\": " + lwi::json_string(out) + ", \"arch\": " + arch +
         ", \"epochs\": " + std::to_string(epochs) + more + (empty ? "}" : ", " + rest);
}

/// Prints training progress; returns false (cancel) once Ctrl-C was pressed.
static bool show(const LwiProgress &p) {
  if (std::string(p.stage) == "epoch")
    std::printf("  epoch %lld/%llu  loss %.4f%s\n", (long long)p.epoch + 1, (unsigned long long)p.total, p.loss,
                p.metric == p.metric ? ("  dice " + std::to_string(p.metric)).c_str() : "");
  std::fflush(stdout);
  return !interrupted.load();
}

int main(int argc, char **argv) {
  std::string dataset, arch_file, init_cfg, tune_cfg, work, device = "auto";
  int init_epochs = 10, tune_epochs = 20;
  std::vector<std::string> images;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    try {
      if (a == "--dataset") dataset = value();
      else if (a == "--arch") arch_file = value();
      else if (a == "--init-config") init_cfg = value();
      else if (a == "--tune-config") tune_cfg = value();
      else if (a == "--work") work = value();
      else if (a == "--device") device = value();
      else if (a == "--init-epochs") init_epochs = std::stoi(value());
      else if (a == "--tune-epochs") tune_epochs = std::stoi(value());
      else images.push_back(a);
    } catch (const std::exception &e) {
      std::cerr << "lwi_host: " << e.what() << "\n";
      return 2;
    }
  }
  if (dataset.empty() || arch_file.empty() || init_cfg.empty() || tune_cfg.empty() || work.empty()) {
    std::cerr << "usage: lwi_host --dataset D.json --arch ARCH.json --init-config I.json --tune-config T.json "
                 "--work DIR [--init-epochs N] [--tune-epochs N] [--device D] IMAGE...\n";
    return 2;
  }
  // Keep freed memory in the heap: glibc otherwise unmaps every large block on free and the next
  // window's activations fault in fresh zeroed pages (a third of CPU segmentation time, measured in
  // docs/performance.md). A host decides this for its own process; lwi never changes it.
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  std::signal(SIGINT, [](int) { interrupted = true; });
  try {
    lwi::require_abi();
    lwi::Engine engine("{\"device\": " + lwi::json_string(device) + "}");
    std::string arch = read_file(arch_file);
    std::filesystem::create_directories(work);
    std::string init = work + "/init.safetensors", model_path = work + "/model.safetensors";
    std::cout << "init-train → " << init << std::endl;
    engine.init_train(stage_config(dataset, init, arch, init_epochs, init_cfg), show);
    std::cout << "fine-tune → " << model_path << std::endl;
    engine.fine_tune(stage_config(dataset, model_path, arch, tune_epochs, tune_cfg, ", \"init\": " + lwi::json_string(init)), show);
    lwi::Model model(engine, model_path);
    for (const auto &image : images) {
      std::string name = image.substr(image.find_last_of('/') + 1);
      std::string out = work + "/" + name;
      model.segment_file(image, out, "{}", [](const LwiProgress &) { return !interrupted.load(); });
      std::cout << "segmented " << image << " → " << out << std::endl;
    }
    return 0;
  } catch (const lwi::Error &e) {
    std::cerr << "lwi_host: " << e.what() << "\n";
    return e.status() == LWI_STATUS_CANCELLED ? 130 : 1;
  } catch (const std::exception &e) {
    std::cerr << "lwi_host: " << e.what() << "\n";
    return 1;
  }
}
