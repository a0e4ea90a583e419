#!/bin/bash
# usage: mkbundle.sh DIR PROGRAMS...
set -e
dir=$1; shift
rm -rf $dir; mkdir -p $dir/bin $dir/lib
for p in "$@"; do
  cp $p $dir/bin/
  ldd $p | awk '/=> \// {print $3}' | while read lib; do
    case $(basename $lib) in
      libc.so*|libm.so*|libstdc++*|libgcc_s*|ld-linux*|libcuda.so*|libcudart*|libcublas*|libnccl*|libpthread*|libdl.so*|librt.so*) ;;
      *) cp -n $lib $dir/lib/ 2>/dev/null || true ;;
    esac
  done
done
# UCX loads transport modules at run time
[ -d /usr/lib/x86_64-linux-gnu/ucx ] && cp -r /usr/lib/x86_64-linux-gnu/ucx $dir/lib/ || true
cat > $dir/env.sh <<'EOS'
export LD_LIBRARY_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib:${LD_LIBRARY_PATH}"
EOS
strip --strip-unneeded $dir/bin/* $dir/lib/*.so* 2>/dev/null || true
du -sh $dir
