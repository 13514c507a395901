#include <cstdio>

#include "lwi.hpp"

int main() {
  lwi::require_abi();
  std::printf("abi %u\n%s\n", lwi_abi_version(), lwi_version_json());
  return 0;
}
