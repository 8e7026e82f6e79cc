using System.Runtime.InteropServices;
using System.Text;

namespace SparseAttention.Training;

/// <summary>
/// Writes files so that a reader (or a machine that loses power) sees either the previous file or the complete new one,
/// never a half-written one: the content goes to <c>FILE.tmp</c> in the same folder, which is flushed and synced to
/// disk, then renamed over <c>FILE</c>, and the folder is synced so the rename itself is durable (on Linux and macOS;
/// Windows cannot sync a folder). Used by every writer of checkpoints, weights, configurations, logs, JSON and PNG files.
/// </summary>
public static partial class AtomicFile
{
    /// <summary>Writes <paramref name="text"/> (UTF-8, no byte-order mark) to <paramref name="path"/> atomically.</summary>
    public static void WriteAllText(string path, string text) => Write(path, stream => stream.Write(new UTF8Encoding(false).GetBytes(text)));

    /// <summary>Writes <paramref name="bytes"/> to <paramref name="path"/> atomically.</summary>
    public static void WriteAllBytes(string path, byte[] bytes) => Write(path, stream => stream.Write(bytes));

    /// <summary>
    /// Creates the folder of <paramref name="path"/> if needed, calls <paramref name="write"/> with a seekable stream on
    /// <c>path.tmp</c>, syncs it to disk, renames it over <paramref name="path"/> and syncs the folder. If anything
    /// fails (<paramref name="write"/> throws, the disk is full), the temporary file is removed, <paramref name="path"/>
    /// is left as it was and the exception propagates (an <see cref="IOException"/> or <see cref="UnauthorizedAccessException"/>
    /// from the file system becomes an <see cref="IOException"/> naming <paramref name="path"/>).
    /// </summary>
    public static void Write(string path, Action<Stream> write)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        ArgumentNullException.ThrowIfNull(write);
        string full = Path.GetFullPath(path);
        string tmp = full + ".tmp";
        string? dir = Path.GetDirectoryName(full);
        try
        {
            if (!string.IsNullOrEmpty(dir)) Directory.CreateDirectory(dir);
            using (var stream = new FileStream(tmp, FileMode.Create, FileAccess.ReadWrite, FileShare.None, 1 << 16))
            {
                write(stream);
                stream.Flush(flushToDisk: true);
            }
            File.Move(tmp, full, overwrite: true);
        }
        catch (Exception e)
        {
            try { File.Delete(tmp); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            if (e is IOException or UnauthorizedAccessException) throw new IOException($"cannot write {path}: {e.Message}", e);
            throw;
        }
        if (!string.IsNullOrEmpty(dir)) SyncDirectory(dir);
    }

    /// <summary>Makes a rename in <paramref name="dir"/> durable: fsync of the folder where the OS allows it (best effort).</summary>
    private static void SyncDirectory(string dir)
    {
        if (!OperatingSystem.IsLinux() && !OperatingSystem.IsMacOS()) return;
        try
        {
            int fd = Open(dir, 0);                                                     // O_RDONLY
            if (fd < 0) return;
            FSync(fd);
            Close(fd);
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException) { }
    }

    [LibraryImport("libc", EntryPoint = "open", StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Open(string path, int flags);

    [LibraryImport("libc", EntryPoint = "fsync")]
    private static partial int FSync(int fd);

    [LibraryImport("libc", EntryPoint = "close")]
    private static partial int Close(int fd);
}
