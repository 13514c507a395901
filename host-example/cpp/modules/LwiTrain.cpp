// LwiInitTrain and LwiFineTune, the 3D Slicer CLI modules that train (this file built twice,
// LWI_FINE_TUNE telling them apart). Slicer runs them as
//   LwiInitTrain [--arch A] [--arch_config A.json] [--config C.json] [--epochs N] [--seed S] [--device D] DATASET OUT
//   LwiFineTune  [--init I.safetensors] (the same; --arch auto by default: the init model's) DATASET OUT
// Progress per iteration and a comment per epoch on stdout; checkpoints as OUT.ckpt; OUT written
// when training ends (a cancel, which Slicer does by killing, keeps the last checkpoint).
#include <fstream>
#include <iostream>
#include <sstream>
#include <sys/stat.h>

#include "cli_module.hpp"
#include "lwi.hpp"

#ifdef LWI_FINE_TUNE
#include "LwiFineTune_descriptor.h"
static const char *kName = "LwiFineTune";
#else
#include "LwiInitTrain_descriptor.h"
static const char *kName = "LwiInitTrain";
#endif

static std::string read_object(const std::string &path, const char *what) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error(std::string(what) + " " + path + ": cannot be read");
  std::stringstream s;
  s << f.rdbuf();
  std::string text = s.str();
  auto open = text.find('{'), close = text.rfind('}');
  if (open == std::string::npos || close == std::string::npos || close < open)
    throw std::runtime_error(std::string(what) + " " + path + ": not a JSON object");
  return text.substr(open, close - open + 1);
}

/// The training config: the config file's object, then ours, as a list the engine merges in order (a
/// field set here replaces the file's).
static std::string training_config(const cli_module::Args &a, const std::string &dataset, const std::string &out) {
  using lwi::json_string;
  std::string body = "\"dataset\": " + json_string(dataset) + ", \"out\": " + json_string(out) +
                     ", \"epochs\": " + std::to_string(a.count("--epochs", 100)) +
                     ", \"seed\": " + std::to_string(a.count("--seed", 0));
  // "auto" (LwiFineTune's default): the architecture config's own "arch" (UNETR without one) or, without a
  // config, none at all: the engine then takes the initial weights' architecture (UNETR from scratch).
  std::string arch = a.get("--arch", "unetr");
  std::string kwargs = a.get("--arch_config").empty() ? "" : read_object(a.get("--arch_config"), "architecture config");
  if (arch == "auto") {
    if (!kwargs.empty()) body += ", \"arch\": " + kwargs;
  } else {
    std::string inner = kwargs.empty() ? "" : kwargs.substr(1, kwargs.size() - 2);
    bool blank = inner.find_first_not_of(" \t\r\n") == std::string::npos;
    body += ", \"arch\": {\"arch\": " + json_string(arch) + (blank ? "" : ", " + inner) + "}";
  }
  if (!a.get("--init").empty()) body += ", \"init\": " + json_string(a.get("--init"));
  std::string file = a.get("--config").empty() ? "{}" : read_object(a.get("--config"), "training config");
  return "[" + file + ", {" + body + "}]";
}

int main(int argc, char **argv) {
  cli_module::Args args;
  try {
    std::set<std::string> flags = {"--arch", "--arch_config", "--config", "--epochs", "--seed", "--device"};
#ifdef LWI_FINE_TUNE
    flags.insert("--init");
#endif
    args = cli_module::parse(argc, argv, kDescriptor, flags, {});
  } catch (const std::exception &e) {
    std::cerr << kName << ": " << e.what() << "\n";
    return 2;
  }
  if (args.positional.size() != 2) {
    std::cerr << "usage: " << kName << " [--arch A] [--arch_config A.json] [--config C.json] [--epochs N] [--seed S] "
#ifdef LWI_FINE_TUNE
              << "[--init I.safetensors] "
#endif
              << "[--device D] DATASET OUT  (or --xml)\n";
    return 2;
  }
  try {
    std::string dataset = args.positional[0];
    struct stat st;
    if (stat(dataset.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) dataset += "/dataset.json";
    std::string config = training_config(args, dataset, args.positional[1]);
    lwi::require_abi();
    cli_module::start(kName, "preparing the training cases");
    lwi::Engine engine("{\"device\": " + lwi::json_string(args.get("--device", "auto")) + "}");
    auto report = [](const LwiProgress &p) {
      std::string stage = p.stage;
      if (stage == "train" && p.total) {
        cli_module::progress(double(p.done) / p.total);
      } else if (stage == "epoch") {
        char line[160];
        std::snprintf(line, sizeof line, "epoch %llu/%llu loss %.4f", (unsigned long long)p.done,
                      (unsigned long long)p.total, p.loss);
        std::string comment = line;
        if (p.metric == p.metric) comment += " validation Dice " + std::to_string(p.metric);
        cli_module::progress(p.total ? double(p.done) / p.total : 0.0, comment);
      }
      return true;
    };
#ifdef LWI_FINE_TUNE
    engine.fine_tune(config, report);
#else
    engine.init_train(config, report);
#endif
    cli_module::end(kName);
    return 0;
  } catch (const std::exception &e) {
    std::cerr << kName << ": " << e.what() << "\n";
    return 1;
  }
}
