// The embedded database's disk: PGlite, out of space mid-write (a new 16 MB WAL segment that does not fit),
// was seen to spin in its WebAssembly for good: no answer, no /healthz, deaf to SIGTERM, not recovering once
// space was freed (an operator's review, a 60 MB tmpfs). So its writes are refused while the disk holding
// ASGD_DATA_DIR has less free than ASGD_MIN_FREE_BYTES plus what the write may take; PostgreSQL fails a
// write it has no room for with an error, and needs no such guard.
import { statfsSync } from 'node:fs';
import { resolve } from 'node:path';

/** Why a write does not fit: the bytes free and needed, and the data directory (absolute). */
export interface DiskShort {
  free: number;
  needed: number;
  dir: string;
}

/** Why a write of about `bytes` does not fit, or null when it does or the disk cannot be read. */
export type DiskRoom = (bytes: number) => DiskShort | null;

export function diskRoom(dir: string, minFreeBytes: number): DiskRoom {
  const absolute = resolve(dir);
  return (bytes) => {
    let free: number;
    try {
      const fs = statfsSync(dir);
      free = fs.bavail * fs.bsize;
    } catch {
      return null; // not knowable here (the directory gone, an odd file system): the write is let through
    }
    const needed = minFreeBytes + bytes;
    return free < needed ? { free, needed, dir: absolute } : null;
  };
}
