// Pixel rows [lo, hi) of a JPEG or PNG held in memory, decoding as little of the image as the format
// allows: a member of the aggregate device reads only the rows of the tiles it renders.
//
// JPEG (libjpeg-turbo): rows before lo are skipped with jpeg_skip_scanlines (their entropy-coded data
// is decoded, as it must be to find the next rows, but no IDCT, upsampling or colour conversion is
// done for them, except the iMCU row holding lo, which fancy upsampling needs as context); rows from
// hi on are never touched (jpeg_abort). Output matches PIL: RGB for colour images (libjpeg's ISLOW
// IDCT and fancy upsampling, its defaults and PIL's), one channel for greyscale.
// PNG (libpng): rows before lo must be inflated and unfiltered (each row is filtered against the one
// above) but are not returned; reading stops after row hi - 1. 8-bit grey, grey+alpha, RGB and RGBA,
// not interlaced: other PNGs are left to PIL by the caller (`supported` is false).
//
// Each call returns [hi - lo, W, C] uint8 and info [W, H, C, rows reconstructed, supported].

#include <torch/extension.h>

#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

namespace {

struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
  bool truncated = false;
};

void jpeg_fail(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

void jpeg_warn(j_common_ptr cinfo, int level) {
  // libjpeg fills a truncated stream with grey and only warns; PIL refuses such a file ("image file is
  // truncated"): so do we, rather than train on grey rows.
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
    auto* err = reinterpret_cast<JpegError*>(cinfo->err);
    err->truncated = true;
    std::snprintf(err->message, sizeof(err->message), "image file is truncated");
    std::longjmp(err->jump, 1);
  }
}

std::vector<torch::Tensor> jpeg_rows(const torch::Tensor& data, int64_t lo, int64_t hi) {
  TORCH_CHECK(data.dtype() == torch::kUInt8 && data.dim() == 1 && data.is_contiguous() && data.device().is_cpu(),
              "jpeg_rows: data must be the file's bytes as a contiguous 1-D uint8 CPU tensor");
  jpeg_decompress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_fail;
  err.mgr.emit_message = jpeg_warn;
  torch::Tensor out;
  int64_t reconstructed = 0;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    throw std::runtime_error(std::string("cannot decode JPEG: ") + err.message);
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data.data_ptr<uint8_t>(), static_cast<unsigned long>(data.numel()));
  jpeg_read_header(&cinfo, TRUE);
  const int64_t width = cinfo.image_width, height = cinfo.image_height;
  bool supported = cinfo.jpeg_color_space == JCS_GRAYSCALE || cinfo.jpeg_color_space == JCS_YCbCr ||
                   cinfo.jpeg_color_space == JCS_RGB;
  int64_t channels = cinfo.jpeg_color_space == JCS_GRAYSCALE ? 1 : 3;
  if (!supported || lo < 0 || hi > height || lo > hi) {
    jpeg_destroy_decompress(&cinfo);
    TORCH_CHECK(!supported, "jpeg_rows: rows [", lo, ", ", hi, ") outside the image's ", height, " rows");
    return {torch::empty({0, width, 1}, torch::kUInt8),
            torch::tensor({width, height, int64_t(0), int64_t(0), int64_t(0)}, torch::kInt64)};
  }
  cinfo.out_color_space = channels == 1 ? JCS_GRAYSCALE : JCS_RGB;
  out = torch::empty({hi - lo, width, channels}, torch::kUInt8);
  if (hi > lo) {
    jpeg_start_decompress(&cinfo);
    if (lo > 0) {
      JDIMENSION skipped = jpeg_skip_scanlines(&cinfo, static_cast<JDIMENSION>(lo));
      TORCH_CHECK(skipped == static_cast<JDIMENSION>(lo), "jpeg_rows: skipped ", skipped, " rows, not ", lo);
    }
    uint8_t* base = out.data_ptr<uint8_t>();
    while (static_cast<int64_t>(cinfo.output_scanline) < hi) {
      JSAMPROW row = base + (static_cast<int64_t>(cinfo.output_scanline) - lo) * width * channels;
      reconstructed += jpeg_read_scanlines(&cinfo, &row, 1);
    }
  }
  jpeg_abort_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return {out, torch::tensor({width, height, channels, reconstructed, int64_t(1)}, torch::kInt64)};
}

struct PngSource {
  const uint8_t* data;
  size_t size, at;
};

void png_read_memory(png_structp png, png_bytep out, png_size_t n) {
  auto* src = static_cast<PngSource*>(png_get_io_ptr(png));
  if (src->at + n > src->size) png_error(png, "image file is truncated");
  std::memcpy(out, src->data + src->at, n);
  src->at += n;
}

void png_fail(png_structp png, png_const_charp message) {
  auto* text = static_cast<std::string*>(png_get_error_ptr(png));
  *text = message;
  png_longjmp(png, 1);
}

void png_warn(png_structp, png_const_charp) {}

std::vector<torch::Tensor> png_rows(const torch::Tensor& data, int64_t lo, int64_t hi) {
  TORCH_CHECK(data.dtype() == torch::kUInt8 && data.dim() == 1 && data.is_contiguous() && data.device().is_cpu(),
              "png_rows: data must be the file's bytes as a contiguous 1-D uint8 CPU tensor");
  std::string message;
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &message, png_fail, png_warn);
  TORCH_CHECK(png != nullptr, "png_rows: out of memory");
  png_infop info = png_create_info_struct(png);
  PngSource src{data.data_ptr<uint8_t>(), static_cast<size_t>(data.numel()), 0};
  torch::Tensor out;
  int64_t reconstructed = 0, width = 0, height = 0, channels = 0;
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw std::runtime_error("cannot decode PNG: " + message);
  }
  png_set_read_fn(png, &src, png_read_memory);
  png_read_info(png, info);
  width = png_get_image_width(png, info);
  height = png_get_image_height(png, info);
  const int depth = png_get_bit_depth(png, info), type = png_get_color_type(png, info);
  const bool interlaced = png_get_interlace_type(png, info) != PNG_INTERLACE_NONE;
  const bool trns = png_get_valid(png, info, PNG_INFO_tRNS) != 0;  // PIL turns tRNS into modes we leave to it
  channels = type == PNG_COLOR_TYPE_GRAY ? 1 : type == PNG_COLOR_TYPE_GRAY_ALPHA ? 2 : type == PNG_COLOR_TYPE_RGB ? 3
           : type == PNG_COLOR_TYPE_RGB_ALPHA ? 4 : 0;
  const bool supported = depth == 8 && channels > 0 && !interlaced && !trns;
  if (!supported || lo < 0 || hi > height || lo > hi) {
    png_destroy_read_struct(&png, &info, nullptr);
    TORCH_CHECK(!supported, "png_rows: rows [", lo, ", ", hi, ") outside the image's ", height, " rows");
    return {torch::empty({0, width, 1}, torch::kUInt8),
            torch::tensor({width, height, int64_t(0), int64_t(0), int64_t(0)}, torch::kInt64)};
  }
  out = torch::empty({hi - lo, width, channels}, torch::kUInt8);
  std::vector<uint8_t> scratch(static_cast<size_t>(width * channels));
  uint8_t* base = out.data_ptr<uint8_t>();
  for (int64_t y = 0; y < hi; ++y) {  // rows before lo are unfiltered into scratch and dropped
    png_read_row(png, y >= lo ? base + (y - lo) * width * channels : scratch.data(), nullptr);
    ++reconstructed;
  }
  png_destroy_read_struct(&png, &info, nullptr);  // the rest of the stream is never inflated
  return {out, torch::tensor({width, height, channels, reconstructed, int64_t(1)}, torch::kInt64)};
}

}  // namespace

TORCH_LIBRARY(ms_splatfacto_image, m) {
  m.def("jpeg_rows(Tensor data, int lo, int hi) -> Tensor[]", jpeg_rows);
  m.def("png_rows(Tensor data, int lo, int hi) -> Tensor[]", png_rows);
}
