#pragma once
// Peak resident memory of this process image in MiB (VmHWM of /proc/self/status). Not getrusage's
// ru_maxrss: that survives exec, so a child of a large Python process would report the parent's size.
#include <fstream>
#include <string>

namespace bench {

inline double peak_rss_mib() {
    std::ifstream status("/proc/self/status");
    for (std::string line; std::getline(status, line);)
        if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
    return -1.0;
}

}  // namespace bench
