/**
 * Storage for keys and certificates (certmagic's storage.go / filestorage.go).
 *
 * {@link Storage} is the plug point; {@link FileStorage} is the default backend: a folder
 * (`tls.storage`) where every write is atomic (temp file in the same folder, fsync, rename, fsync
 * of the folder), so a crash mid-write never leaves a half file that is later loaded. Private keys
 * are written with mode 0600.
 */
import { randomBytes } from 'node:crypto';
import { link, mkdir, open, readFile, readdir, rename, rm } from 'node:fs/promises';
import { dirname, join, relative, resolve, sep } from 'node:path';

/** A key-value store of small files, keyed by slash-separated relative paths. */
export interface Storage {
  /** Read a value; undefined when absent. */
  load(key: string): Promise<Buffer | undefined>;
  /** Write a value atomically; `secret` values (private keys) are readable by the owner only. */
  store(key: string, value: string | Buffer, options?: { secret?: boolean }): Promise<void>;
  /** Remove a value; absent is not an error. */
  delete(key: string): Promise<void>;
  /** Keys directly or indirectly under a prefix (folder). */
  list(prefix: string): Promise<string[]>;
  /**
   * Create a value only when the key does not exist yet, atomically: readers see no value or the
   * whole value, and of two concurrent callers (even in two processes) exactly one wins. The
   * building block of locks (`acme/lock.ts`) and of keys that must be generated once (ACME account
   * keys). Optional: a backend without it gets in-process locking only.
   * @returns true when this call created the value, false when the key already existed.
   */
  storeExclusive?(key: string, value: string | Buffer, options?: { secret?: boolean }): Promise<boolean>;
}

/**
 * Atomically replace `file` with `data`: write `file.tmp-<random>`, fsync, rename over `file`,
 * fsync the folder. Readers see the old or the new content, never a part.
 * @param mode file mode, e.g. 0o600 for private keys (default 0o644).
 * @throws the underlying fs error (ENOSPC, EACCES, ...) after removing the temp file.
 */
export async function writeFileAtomic(file: string, data: string | Buffer, mode = 0o644): Promise<void> {
  const folder = dirname(file);
  await mkdir(folder, { recursive: true, mode: 0o700 });
  const temp = `${file}.tmp-${randomBytes(6).toString('hex')}`;
  const handle = await open(temp, 'wx', mode);
  try {
    await handle.writeFile(data);
    await handle.chmod(mode); // umask must not widen or narrow what was asked
    await handle.sync();
  } catch (error) {
    await handle.close().catch(() => {});
    await rm(temp, { force: true });
    throw error;
  }
  await handle.close();
  try {
    await rename(temp, file);
  } catch (error) {
    await rm(temp, { force: true });
    throw error;
  }
  await syncFolder(folder);
}

async function syncFolder(folder: string): Promise<void> {
  let handle;
  try {
    handle = await open(folder, 'r');
    await handle.sync();
  } catch {
    // Some file systems refuse fsync on a folder; the rename is still atomic.
  } finally {
    await handle?.close().catch(() => {});
  }
}

/** The default {@link Storage}: files under one folder. */
export class FileStorage implements Storage {
  readonly root: string;

  /** @param root the folder (`tls.storage`); created on first write with mode 0700. */
  constructor(root: string) {
    this.root = resolve(root);
  }

  /** Absolute path of a key. @throws {Error} when the key escapes the root (`..`). */
  pathOf(key: string): string {
    const file = resolve(this.root, key);
    if (file !== this.root && !file.startsWith(this.root + sep)) throw new Error(`storage key escapes the storage folder: ${key}`);
    return file;
  }

  async load(key: string): Promise<Buffer | undefined> {
    try {
      return await readFile(this.pathOf(key));
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw error;
    }
  }

  async store(key: string, value: string | Buffer, options: { secret?: boolean } = {}): Promise<void> {
    await writeFileAtomic(this.pathOf(key), value, options.secret ? 0o600 : 0o644);
  }

  /**
   * Write a temp file (fsync), then hard-link it to the key's path: link(2) fails with EEXIST when
   * the path exists, so creation is exclusive across processes, and the linked file is complete
   * from the first moment it is visible (an O_EXCL create followed by a write would not be).
   */
  async storeExclusive(key: string, value: string | Buffer, options: { secret?: boolean } = {}): Promise<boolean> {
    const file = this.pathOf(key);
    const mode = options.secret ? 0o600 : 0o644;
    const folder = dirname(file);
    await mkdir(folder, { recursive: true, mode: 0o700 });
    const temp = `${file}.tmp-${randomBytes(6).toString('hex')}`;
    const handle = await open(temp, 'wx', mode);
    try {
      await handle.writeFile(value);
      await handle.chmod(mode);
      await handle.sync();
      await handle.close();
      await link(temp, file);
    } catch (error) {
      await handle.close().catch(() => {});
      if ((error as NodeJS.ErrnoException).code === 'EEXIST') return false;
      throw error;
    } finally {
      await rm(temp, { force: true });
    }
    await syncFolder(folder);
    return true;
  }

  async delete(key: string): Promise<void> {
    await rm(this.pathOf(key), { force: true });
  }

  async list(prefix: string): Promise<string[]> {
    const start = this.pathOf(prefix);
    const out: string[] = [];
    const walk = async (folder: string): Promise<void> => {
      let entries;
      try {
        entries = await readdir(folder, { withFileTypes: true });
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
        throw error;
      }
      for (const entry of entries) {
        const full = join(folder, entry.name);
        if (entry.isDirectory()) await walk(full);
        else if (entry.isFile() && !entry.name.includes('.tmp-')) out.push(relative(this.root, full).split(sep).join('/'));
      }
    };
    await walk(start);
    return out.sort();
  }
}
