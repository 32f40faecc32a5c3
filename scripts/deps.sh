#!/usr/bin/env bash
# Installs the system packages the build and tests need (Debian/Ubuntu): a C++ toolchain, cmake and boost headers
# for Bitcoin Core's consensus engine (bitcoinkernel), OpenSSH for the SSH compute provider, git for the home.
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
[ -d /usr/include/boost ] || need+=(libboost-dev)
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null || need+=(openssh-client)
command -v git >/dev/null || need+=(git)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
