// What the three 3D Slicer CLI modules share: Slicer's command line (flags with values, booleans
// alone, then the index parameters in order), its progress protocol on stdout (<filter-…> tags;
// Slicer shows the last <filter-progress> and the <filter-comment>), errors on stderr with a
// non-zero exit ("Completed with errors", the text in the node's status). Slicer cancels by killing
// the process: the engine writes every output under a temporary name, so nothing partial is left.
#pragma once

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace cli_module {

struct Args {
  std::map<std::string, std::string> values;  // --flag value
  std::set<std::string> switches;             // --flag (a boolean set to true)
  std::vector<std::string> positional;        // the index parameters

  std::string get(const std::string &flag, const std::string &fallback = "") const {
    auto it = values.find(flag);
    return it == values.end() ? fallback : it->second;
  }

  /// `flag`'s value as a number (`fallback` when absent); anything else is an error naming both.
  double number(const std::string &flag, double fallback) const {
    std::string text = get(flag);
    if (text.empty()) return fallback;
    char *end = nullptr;
    double v = std::strtod(text.c_str(), &end);
    if (*end != '\0' || !std::isfinite(v)) throw std::runtime_error(flag + ": not a number: " + text);
    return v;
  }

  /// `flag`'s value as a whole number ≥ 0 (`fallback` when absent).
  unsigned long long count(const std::string &flag, unsigned long long fallback) const {
    std::string text = get(flag);
    if (text.empty()) return fallback;
    char *end = nullptr;
    errno = 0;
    unsigned long long v = std::strtoull(text.c_str(), &end, 10);
    if (text[0] == '-' || *end != '\0' || errno == ERANGE)
      throw std::runtime_error(flag + ": not a whole number >= 0: " + text);
    return v;
  }
};

/// Parses `argv` knowing which flags take a value and which are booleans. `--xml` prints
/// `descriptor` and exits; Slicer's plumbing flags are skipped.
inline Args parse(int argc, char **argv, const char *descriptor, const std::set<std::string> &with_value,
                  const std::set<std::string> &booleans) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    if (s == "--xml") {
      std::fputs(descriptor, stdout);
      std::exit(0);
    } else if (s == "--processinformationaddress" || s == "--returnparameterfile") {
      ++i;
    } else if (with_value.count(s)) {
      if (i + 1 >= argc) throw std::runtime_error(s + " needs a value");
      a.values[s] = argv[++i];
    } else if (booleans.count(s)) {
      a.switches.insert(s);
    } else if (s.rfind("--", 0) == 0) {
      throw std::runtime_error("unknown option " + s);
    } else {
      a.positional.push_back(s);
    }
  }
  return a;
}

inline void start(const char *name, const std::string &comment) {
  std::printf("<filter-start><filter-name>%s</filter-name><filter-comment>%s</filter-comment></filter-start>\n", name,
              comment.c_str());
  std::fflush(stdout);
}

inline void progress(double fraction, const std::string &comment = "") {
  if (!comment.empty()) std::printf("<filter-comment>%s</filter-comment>\n", comment.c_str());
  std::printf("<filter-stage-progress>%.4f</filter-stage-progress>\n<filter-progress>%.4f</filter-progress>\n", fraction,
              fraction);
  std::fflush(stdout);
}

inline void end(const char *name) {
  std::printf("<filter-end><filter-name>%s</filter-name></filter-end>\n", name);
  std::fflush(stdout);
}

}  // namespace cli_module
