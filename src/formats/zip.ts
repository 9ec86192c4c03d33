// Zip archives: the reader for untrusted uploads and the streaming writer in PyTorch's layout.
export { MAX_ZIP_ENTRIES, readZip, type ZipArchive, type ZipEntry, type ZipReadOptions } from './zip-reader.ts';
export { streamToBuffer, zipStream, type ByteStream, type ZipWriterEntry, type ZipWriterOptions } from './zip-writer.ts';
