//! Charts as PNG files with no dependencies: a raster [`Canvas`] with lines, points and a
//! built-in 5×8 bitmap font, a PNG encoder (CRC-32, Adler-32 and a fixed-Huffman LZ77
//! deflate written here), and the two charts the pipeline draws: [`line_chart`] (loss
//! curves from training) and [`reliability_diagram`] (calibration, before and after).
//!
//! Coordinates are pixels, origin top-left; drawing outside the canvas (or outside the
//! current clip rectangle) is silently dropped, which is what a plot wants for lines that
//! leave the axes.

use crate::data::Winner;
use crate::metrics::{clip_and_normalise, Probs};
use anyhow::{bail, Result};
use std::path::Path;

/// An 8-bit RGB colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rgb(pub u8, pub u8, pub u8);

pub const WHITE: Rgb = Rgb(255, 255, 255);
pub const BLACK: Rgb = Rgb(0, 0, 0);
const GRID: Rgb = Rgb(228, 228, 228);
const AXIS: Rgb = Rgb(60, 60, 60);
const DIAGONAL: Rgb = Rgb(150, 150, 150);

/// Series colours in order (colour-blind-friendly: Okabe–Ito).
pub const PALETTE: [Rgb; 6] = [
    Rgb(0, 114, 178),
    Rgb(213, 94, 0),
    Rgb(0, 158, 115),
    Rgb(204, 121, 167),
    Rgb(230, 159, 0),
    Rgb(86, 180, 233),
];

// ---------------------------------------------------------------------------------------
// Checksums and compression

/// CRC-32 (ISO-HDLC, reflected polynomial 0xEDB88320) as PNG chunks use it.
pub fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut n = 0;
        while n < 256 {
            let mut c = n as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[n] = c;
            n += 1;
        }
        table
    };
    !bytes.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8)
    })
}

/// Adler-32, the checksum that ends a zlib stream.
pub fn adler32(bytes: &[u8]) -> u32 {
    const MOD: u32 = 65_521;
    // 5552 is the largest run for which the sums cannot overflow u32 before the modulo.
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in bytes.chunks(5552) {
        for &x in chunk {
            a += x as u32;
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

/// Writes bits least-significant first, as deflate packs them.
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    bits: u32,
}

impl BitWriter {
    fn put(&mut self, value: u32, count: u32) {
        self.acc |= (value as u64) << self.bits;
        self.bits += count;
        while self.bits >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.bits -= 8;
        }
    }

    /// A Huffman code, which deflate stores most-significant bit first.
    fn put_code(&mut self, code: u32, len: u32) {
        self.put(code.reverse_bits() >> (32 - len), len);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.bits > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

const LENGTH_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LENGTH_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];

/// Emits a literal/length symbol with the fixed Huffman code of RFC 1951 §3.2.6.
fn put_fixed_symbol(w: &mut BitWriter, sym: u32) {
    match sym {
        0..=143 => w.put_code(0x30 + sym, 8),
        144..=255 => w.put_code(0x190 + sym - 144, 9),
        256..=279 => w.put_code(sym - 256, 7),
        _ => w.put_code(0xC0 + sym - 280, 8),
    }
}

fn put_match(w: &mut BitWriter, len: usize, dist: usize) {
    let l = LENGTH_BASE.partition_point(|&b| b as usize <= len) - 1;
    put_fixed_symbol(w, 257 + l as u32);
    w.put(
        (len - LENGTH_BASE[l] as usize) as u32,
        LENGTH_EXTRA[l] as u32,
    );
    let d = DIST_BASE.partition_point(|&b| b as usize <= dist) - 1;
    w.put_code(d as u32, 5);
    w.put((dist - DIST_BASE[d] as usize) as u32, DIST_EXTRA[d] as u32);
}

/// Raw deflate (RFC 1951): one fixed-Huffman block, greedy LZ77 over a 32 KiB window with
/// hash chains. Plots are mostly runs of background, which this shrinks ~50–100×.
pub fn deflate(data: &[u8]) -> Vec<u8> {
    const WINDOW: usize = 32_768;
    const MAX_LEN: usize = 258;
    const HASH_BITS: u32 = 15;
    const MAX_CHAIN: usize = 32;
    const NONE: usize = usize::MAX;
    let mut w = BitWriter {
        out: Vec::with_capacity(data.len() / 8 + 16),
        acc: 0,
        bits: 0,
    };
    w.put(1, 1); // BFINAL: this is the only block
    w.put(1, 2); // BTYPE 01: fixed Huffman codes
    let hash = |i: usize| {
        let v = u32::from_le_bytes([data[i], data[i + 1], data[i + 2], 0]);
        (v.wrapping_mul(0x9E37_79B1) >> (32 - HASH_BITS)) as usize
    };
    let mut head = vec![NONE; 1 << HASH_BITS];
    let mut prev = vec![NONE; WINDOW];
    let insert = |i: usize, head: &mut [usize], prev: &mut [usize]| {
        if i + 3 <= data.len() {
            let h = hash(i);
            prev[i % WINDOW] = head[h];
            head[h] = i;
        }
    };
    let mut i = 0;
    while i < data.len() {
        let (mut best_len, mut best_dist) = (0, 0);
        if i + 3 <= data.len() {
            let max_len = MAX_LEN.min(data.len() - i);
            let mut cand = head[hash(i)];
            let mut chain = 0;
            while cand != NONE && i - cand <= WINDOW && chain < MAX_CHAIN {
                let len = data[cand..cand + max_len]
                    .iter()
                    .zip(&data[i..i + max_len])
                    .take_while(|(a, b)| a == b)
                    .count();
                if len > best_len {
                    (best_len, best_dist) = (len, i - cand);
                    if len == max_len {
                        break;
                    }
                }
                let next = prev[cand % WINDOW];
                // A slot may have been reused by a newer position: stop rather than loop.
                if next == NONE || next >= cand {
                    break;
                }
                cand = next;
                chain += 1;
            }
        }
        if best_len >= 3 {
            put_match(&mut w, best_len, best_dist);
            for j in i..i + best_len {
                insert(j, &mut head, &mut prev);
            }
            i += best_len;
        } else {
            put_fixed_symbol(&mut w, data[i] as u32);
            insert(i, &mut head, &mut prev);
            i += 1;
        }
    }
    put_fixed_symbol(&mut w, 256); // end of block
    w.finish()
}

/// A zlib stream (RFC 1950): header, [`deflate`] data, Adler-32 of the input.
pub fn zlib_compress(data: &[u8]) -> Vec<u8> {
    // CMF 0x78: deflate, 32 KiB window; FLG 0x01 makes CMF·256+FLG a multiple of 31.
    let mut out = vec![0x78, 0x01];
    out.extend(deflate(data));
    out.extend(adler32(data).to_be_bytes());
    out
}

/// Encodes 8-bit RGB pixels (row-major, `width * height * 3` bytes) as a PNG file.
pub fn encode_png(width: usize, height: usize, rgb: &[u8]) -> Vec<u8> {
    assert_eq!(rgb.len(), width * height * 3, "pixel buffer size");
    let mut raw = Vec::with_capacity(height * (width * 3 + 1));
    for row in rgb.chunks(width * 3) {
        raw.push(0); // filter type 0 (None): the LZ77 stage already finds repeated rows
        raw.extend_from_slice(row);
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8; 4], body: &[u8]| {
        png.extend((body.len() as u32).to_be_bytes());
        let start = png.len();
        png.extend(kind);
        png.extend(body);
        let crc = crc32(&png[start..]);
        png.extend(crc.to_be_bytes());
    };
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend((width as u32).to_be_bytes());
    ihdr.extend((height as u32).to_be_bytes());
    // Bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace.
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &zlib_compress(&raw));
    chunk(b"IEND", &[]);
    png
}

// ---------------------------------------------------------------------------------------
// Font

/// Glyph cell: 5 columns (bit 4 = leftmost) × 8 rows; row 7 holds descenders.
const GLYPH_W: usize = 5;
const GLYPH_H: usize = 8;
/// Horizontal advance per character, including one column of spacing.
const ADVANCE: usize = GLYPH_W + 1;

/// ASCII 32..=126 in a classic 5×7 LCD style.
#[rustfmt::skip]
const FONT: [[u8; GLYPH_H]; 95] = [
    [0x00,0x00,0x00,0x00,0x00,0x00,0x00,0x00], // ' '
    [0x04,0x04,0x04,0x04,0x04,0x00,0x04,0x00], // !
    [0x0A,0x0A,0x0A,0x00,0x00,0x00,0x00,0x00], // "
    [0x0A,0x0A,0x1F,0x0A,0x1F,0x0A,0x0A,0x00], // #
    [0x04,0x0F,0x14,0x0E,0x05,0x1E,0x04,0x00], // $
    [0x18,0x19,0x02,0x04,0x08,0x13,0x03,0x00], // %
    [0x0C,0x12,0x14,0x08,0x15,0x12,0x0D,0x00], // &
    [0x0C,0x04,0x08,0x00,0x00,0x00,0x00,0x00], // '
    [0x02,0x04,0x08,0x08,0x08,0x04,0x02,0x00], // (
    [0x08,0x04,0x02,0x02,0x02,0x04,0x08,0x00], // )
    [0x00,0x04,0x15,0x0E,0x15,0x04,0x00,0x00], // *
    [0x00,0x04,0x04,0x1F,0x04,0x04,0x00,0x00], // +
    [0x00,0x00,0x00,0x00,0x00,0x0C,0x04,0x08], // ,
    [0x00,0x00,0x00,0x1F,0x00,0x00,0x00,0x00], // -
    [0x00,0x00,0x00,0x00,0x00,0x0C,0x0C,0x00], // .
    [0x00,0x01,0x02,0x04,0x08,0x10,0x00,0x00], // /
    [0x0E,0x11,0x13,0x15,0x19,0x11,0x0E,0x00], // 0
    [0x04,0x0C,0x04,0x04,0x04,0x04,0x0E,0x00], // 1
    [0x0E,0x11,0x01,0x02,0x04,0x08,0x1F,0x00], // 2
    [0x1F,0x02,0x04,0x02,0x01,0x11,0x0E,0x00], // 3
    [0x02,0x06,0x0A,0x12,0x1F,0x02,0x02,0x00], // 4
    [0x1F,0x10,0x1E,0x01,0x01,0x11,0x0E,0x00], // 5
    [0x06,0x08,0x10,0x1E,0x11,0x11,0x0E,0x00], // 6
    [0x1F,0x01,0x02,0x04,0x08,0x08,0x08,0x00], // 7
    [0x0E,0x11,0x11,0x0E,0x11,0x11,0x0E,0x00], // 8
    [0x0E,0x11,0x11,0x0F,0x01,0x02,0x0C,0x00], // 9
    [0x00,0x0C,0x0C,0x00,0x0C,0x0C,0x00,0x00], // :
    [0x00,0x0C,0x0C,0x00,0x0C,0x04,0x08,0x00], // ;
    [0x02,0x04,0x08,0x10,0x08,0x04,0x02,0x00], // <
    [0x00,0x00,0x1F,0x00,0x1F,0x00,0x00,0x00], // =
    [0x08,0x04,0x02,0x01,0x02,0x04,0x08,0x00], // >
    [0x0E,0x11,0x01,0x02,0x04,0x00,0x04,0x00], // ?
    [0x0E,0x11,0x01,0x0D,0x15,0x15,0x0E,0x00], // @
    [0x0E,0x11,0x11,0x11,0x1F,0x11,0x11,0x00], // A
    [0x1E,0x11,0x11,0x1E,0x11,0x11,0x1E,0x00], // B
    [0x0E,0x11,0x10,0x10,0x10,0x11,0x0E,0x00], // C
    [0x1C,0x12,0x11,0x11,0x11,0x12,0x1C,0x00], // D
    [0x1F,0x10,0x10,0x1E,0x10,0x10,0x1F,0x00], // E
    [0x1F,0x10,0x10,0x1E,0x10,0x10,0x10,0x00], // F
    [0x0E,0x11,0x10,0x17,0x11,0x11,0x0F,0x00], // G
    [0x11,0x11,0x11,0x1F,0x11,0x11,0x11,0x00], // H
    [0x0E,0x04,0x04,0x04,0x04,0x04,0x0E,0x00], // I
    [0x07,0x02,0x02,0x02,0x02,0x12,0x0C,0x00], // J
    [0x11,0x12,0x14,0x18,0x14,0x12,0x11,0x00], // K
    [0x10,0x10,0x10,0x10,0x10,0x10,0x1F,0x00], // L
    [0x11,0x1B,0x15,0x15,0x11,0x11,0x11,0x00], // M
    [0x11,0x11,0x19,0x15,0x13,0x11,0x11,0x00], // N
    [0x0E,0x11,0x11,0x11,0x11,0x11,0x0E,0x00], // O
    [0x1E,0x11,0x11,0x1E,0x10,0x10,0x10,0x00], // P
    [0x0E,0x11,0x11,0x11,0x15,0x12,0x0D,0x00], // Q
    [0x1E,0x11,0x11,0x1E,0x14,0x12,0x11,0x00], // R
    [0x0F,0x10,0x10,0x0E,0x01,0x01,0x1E,0x00], // S
    [0x1F,0x04,0x04,0x04,0x04,0x04,0x04,0x00], // T
    [0x11,0x11,0x11,0x11,0x11,0x11,0x0E,0x00], // U
    [0x11,0x11,0x11,0x11,0x11,0x0A,0x04,0x00], // V
    [0x11,0x11,0x11,0x15,0x15,0x15,0x0A,0x00], // W
    [0x11,0x11,0x0A,0x04,0x0A,0x11,0x11,0x00], // X
    [0x11,0x11,0x11,0x0A,0x04,0x04,0x04,0x00], // Y
    [0x1F,0x01,0x02,0x04,0x08,0x10,0x1F,0x00], // Z
    [0x0E,0x08,0x08,0x08,0x08,0x08,0x0E,0x00], // [
    [0x00,0x10,0x08,0x04,0x02,0x01,0x00,0x00], // backslash
    [0x0E,0x02,0x02,0x02,0x02,0x02,0x0E,0x00], // ]
    [0x04,0x0A,0x11,0x00,0x00,0x00,0x00,0x00], // ^
    [0x00,0x00,0x00,0x00,0x00,0x00,0x1F,0x00], // _
    [0x08,0x04,0x02,0x00,0x00,0x00,0x00,0x00], // `
    [0x00,0x00,0x0E,0x01,0x0F,0x11,0x0F,0x00], // a
    [0x10,0x10,0x16,0x19,0x11,0x11,0x1E,0x00], // b
    [0x00,0x00,0x0E,0x10,0x10,0x11,0x0E,0x00], // c
    [0x01,0x01,0x0D,0x13,0x11,0x11,0x0F,0x00], // d
    [0x00,0x00,0x0E,0x11,0x1F,0x10,0x0E,0x00], // e
    [0x06,0x09,0x08,0x1C,0x08,0x08,0x08,0x00], // f
    [0x00,0x00,0x0F,0x11,0x11,0x0F,0x01,0x0E], // g
    [0x10,0x10,0x16,0x19,0x11,0x11,0x11,0x00], // h
    [0x04,0x00,0x0C,0x04,0x04,0x04,0x0E,0x00], // i
    [0x02,0x00,0x06,0x02,0x02,0x02,0x12,0x0C], // j
    [0x10,0x10,0x12,0x14,0x18,0x14,0x12,0x00], // k
    [0x0C,0x04,0x04,0x04,0x04,0x04,0x0E,0x00], // l
    [0x00,0x00,0x1A,0x15,0x15,0x11,0x11,0x00], // m
    [0x00,0x00,0x16,0x19,0x11,0x11,0x11,0x00], // n
    [0x00,0x00,0x0E,0x11,0x11,0x11,0x0E,0x00], // o
    [0x00,0x00,0x1E,0x11,0x11,0x1E,0x10,0x10], // p
    [0x00,0x00,0x0F,0x11,0x11,0x0F,0x01,0x01], // q
    [0x00,0x00,0x16,0x19,0x10,0x10,0x10,0x00], // r
    [0x00,0x00,0x0E,0x10,0x0E,0x01,0x1E,0x00], // s
    [0x08,0x08,0x1C,0x08,0x08,0x09,0x06,0x00], // t
    [0x00,0x00,0x11,0x11,0x11,0x13,0x0D,0x00], // u
    [0x00,0x00,0x11,0x11,0x11,0x0A,0x04,0x00], // v
    [0x00,0x00,0x11,0x11,0x15,0x15,0x0A,0x00], // w
    [0x00,0x00,0x11,0x0A,0x04,0x0A,0x11,0x00], // x
    [0x00,0x00,0x11,0x11,0x11,0x0F,0x01,0x0E], // y
    [0x00,0x00,0x1F,0x02,0x04,0x08,0x1F,0x00], // z
    [0x02,0x04,0x04,0x08,0x04,0x04,0x02,0x00], // {
    [0x04,0x04,0x04,0x04,0x04,0x04,0x04,0x00], // |
    [0x08,0x04,0x04,0x02,0x04,0x04,0x08,0x00], // }
    [0x00,0x00,0x08,0x15,0x02,0x00,0x00,0x00], // ~
];

/// The glyph of a character; characters outside printable ASCII draw as '?'.
fn glyph(c: char) -> &'static [u8; GLYPH_H] {
    let code = c as u32;
    let index = if (32..=126).contains(&code) {
        code - 32
    } else {
        '?' as u32 - 32
    };
    &FONT[index as usize]
}

/// Width in pixels of `text` drawn at `scale`.
pub fn text_width(text: &str, scale: usize) -> usize {
    (text.chars().count() * ADVANCE).saturating_sub(1) * scale
}

// ---------------------------------------------------------------------------------------
// Canvas

/// A rectangle in pixels: left, top, width, height.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: i64,
    pub y: i64,
    pub w: i64,
    pub h: i64,
}

impl Rect {
    fn contains(&self, x: i64, y: i64) -> bool {
        x >= self.x && y >= self.y && x < self.x + self.w && y < self.y + self.h
    }
}

/// An RGB raster image to draw on.
pub struct Canvas {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
    clip: Rect,
}

impl Canvas {
    /// A canvas filled with `background`.
    pub fn new(width: usize, height: usize, background: Rgb) -> Canvas {
        let rgb = [background.0, background.1, background.2].repeat(width * height);
        Canvas {
            width,
            height,
            rgb,
            clip: Rect {
                x: 0,
                y: 0,
                w: width as i64,
                h: height as i64,
            },
        }
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    /// The colour at (x, y).
    pub fn pixel(&self, x: usize, y: usize) -> Rgb {
        let i = (y * self.width + x) * 3;
        Rgb(self.rgb[i], self.rgb[i + 1], self.rgb[i + 2])
    }

    /// Restricts drawing to `rect` (within the canvas) until the next call.
    pub fn set_clip(&mut self, rect: Option<Rect>) {
        self.clip = rect.unwrap_or(Rect {
            x: 0,
            y: 0,
            w: self.width as i64,
            h: self.height as i64,
        });
    }

    /// Sets one pixel, if it lies inside the canvas and the clip rectangle.
    pub fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if self.clip.contains(x, y) && x < self.width as i64 && y < self.height as i64 {
            let i = (y as usize * self.width + x as usize) * 3;
            self.rgb[i..i + 3].copy_from_slice(&[c.0, c.1, c.2]);
        }
    }

    pub fn fill_rect(&mut self, r: Rect, c: Rgb) {
        for y in r.y..r.y + r.h {
            for x in r.x..r.x + r.w {
                self.set(x, y, c);
            }
        }
    }

    /// The outline of `r`, one pixel wide.
    pub fn stroke_rect(&mut self, r: Rect, c: Rgb) {
        let (x1, y1) = (r.x + r.w - 1, r.y + r.h - 1);
        self.line((r.x, r.y), (x1, r.y), c, 1, None);
        self.line((r.x, y1), (x1, y1), c, 1, None);
        self.line((r.x, r.y), (r.x, y1), c, 1, None);
        self.line((x1, r.y), (x1, y1), c, 1, None);
    }

    /// A straight line `width` pixels thick (Bresenham); `dash` = Some((on, off)) in pixels.
    pub fn line(
        &mut self,
        from: (i64, i64),
        to: (i64, i64),
        c: Rgb,
        width: i64,
        dash: Option<(i64, i64)>,
    ) {
        let (mut x, mut y) = from;
        let (dx, dy) = ((to.0 - x).abs(), -(to.1 - y).abs());
        let (sx, sy) = ((to.0 - x).signum(), (to.1 - y).signum());
        let mut err = dx + dy;
        let mut step = 0i64;
        loop {
            let on = dash.map_or(true, |(on, off)| step % (on + off) < on);
            if on {
                let half = (width - 1) / 2;
                for oy in -half..width - half {
                    for ox in -half..width - half {
                        self.set(x + ox, y + oy, c);
                    }
                }
            }
            if (x, y) == to {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
            step += 1;
        }
    }

    /// A filled disc of radius `r` centred on (x, y).
    pub fn disc(&mut self, x: i64, y: i64, r: i64, c: Rgb) {
        for oy in -r..=r {
            for ox in -r..=r {
                if ox * ox + oy * oy <= r * r + r {
                    self.set(x + ox, y + oy, c);
                }
            }
        }
    }

    /// Draws `text` with its top-left corner at (x, y), each font pixel `scale`² pixels.
    pub fn text(&mut self, x: i64, y: i64, text: &str, c: Rgb, scale: usize) {
        let s = scale as i64;
        for (k, ch) in text.chars().enumerate() {
            let x0 = x + (k * ADVANCE) as i64 * s;
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..GLYPH_W {
                    if bits & (0x10 >> col) != 0 {
                        self.fill_rect(
                            Rect {
                                x: x0 + col as i64 * s,
                                y: y + row as i64 * s,
                                w: s,
                                h: s,
                            },
                            c,
                        );
                    }
                }
            }
        }
    }

    /// Draws `text` rotated 90° counter-clockwise (reading bottom to top), its baseline
    /// start at the bottom-left corner (x, y).
    pub fn text_up(&mut self, x: i64, y: i64, text: &str, c: Rgb, scale: usize) {
        let s = scale as i64;
        for (k, ch) in text.chars().enumerate() {
            let y0 = y - (k * ADVANCE) as i64 * s;
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..GLYPH_W {
                    if bits & (0x10 >> col) != 0 {
                        self.fill_rect(
                            Rect {
                                x: x + row as i64 * s,
                                y: y0 - (col as i64 + 1) * s,
                                w: s,
                                h: s,
                            },
                            c,
                        );
                    }
                }
            }
        }
    }

    /// The image as a PNG file.
    pub fn png(&self) -> Vec<u8> {
        encode_png(self.width, self.height, &self.rgb)
    }

    /// Writes the image as a PNG file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::atomic::write_bytes(path, &self.png())
    }
}

// ---------------------------------------------------------------------------------------
// Charts

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Line,
    Dashed,
    Points,
    LinePoints,
}

/// One named curve of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
    /// `None` takes the next colour of [`PALETTE`] by series position.
    pub color: Option<Rgb>,
}

impl Series {
    /// A solid line in the palette colour of its position.
    pub fn line(name: &str, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.to_string(),
            points,
            style: Style::Line,
            color: None,
        }
    }

    pub fn with_style(mut self, style: Style) -> Series {
        self.style = style;
        self
    }

    pub fn with_color(mut self, color: Rgb) -> Series {
        self.color = Some(color);
        self
    }
}

/// Where the legend box goes inside the plot area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Corner {
    TopLeft,
    TopRight,
}

/// Tick positions covering [lo, hi] at a 1/2/5×10^k step, and the decimals they need.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, usize) {
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    // The 1/2/5 step nearest the raw step on a log scale.
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .min_by(|a, b| (a / raw).ln().abs().total_cmp(&(b / raw).ln().abs()))
        .expect("candidates");
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    ((first..=last).map(|k| k as f64 * step).collect(), decimals)
}

/// Data range of all finite points, widened to whole tick steps; [0, 1] if there are none.
fn data_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let (lo, hi) = if hi - lo < 1e-12 * lo.abs().max(1.0) {
        let pad = 0.5 * lo.abs().max(1e-3);
        (lo - pad, hi + pad)
    } else {
        (lo, hi)
    };
    let (ticks, _) = nice_ticks(lo, hi, 6);
    let step = if ticks.len() >= 2 {
        ticks[1] - ticks[0]
    } else {
        hi - lo
    };
    ((lo / step).floor() * step, (hi / step).ceil() * step)
}

/// One set of axes drawn into a region of a canvas.
struct Panel<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    x_range: (f64, f64),
    y_range: (f64, f64),
    legend: Corner,
}

const TEXT_SCALE: usize = 2;
const TICK_SCALE: usize = 2;
const LINE_H: i64 = (GLYPH_H * TEXT_SCALE) as i64 + 6;

impl Panel<'_> {
    /// Draws axes, grid, ticks, labels, the series and a legend into `area`.
    fn draw(&self, canvas: &mut Canvas, area: Rect, series: &[Series]) {
        // Left margin: rotated y label, gap, tick labels up to 6 characters, tick marks.
        let left =
            8 + (GLYPH_H * TEXT_SCALE) as i64 + 10 + text_width("000000", TICK_SCALE) as i64 + 12;
        let plot = Rect {
            x: area.x + left,
            y: area.y + 2 * LINE_H,
            w: area.w - left - 32,
            h: area.h - 4 * LINE_H - 20,
        };
        let (x0, x1) = self.x_range;
        let (y0, y1) = self.y_range;
        let px = |x: f64| plot.x as f64 + (x - x0) / (x1 - x0) * (plot.w - 1) as f64;
        let py = |y: f64| (plot.y + plot.h - 1) as f64 - (y - y0) / (y1 - y0) * (plot.h - 1) as f64;

        let title_x = area.x + (area.w - text_width(self.title, TEXT_SCALE) as i64) / 2;
        canvas.text(title_x, area.y + 8, self.title, BLACK, TEXT_SCALE);

        let (xt, xd) = nice_ticks(x0, x1, 6);
        let (yt, yd) = nice_ticks(y0, y1, 6);
        for &t in &xt {
            let x = px(t).round() as i64;
            canvas.line((x, plot.y), (x, plot.y + plot.h - 1), GRID, 1, None);
            let label = format!("{t:.xd$}");
            let w = text_width(&label, TICK_SCALE) as i64;
            canvas.line(
                (x, plot.y + plot.h),
                (x, plot.y + plot.h + 4),
                AXIS,
                1,
                None,
            );
            canvas.text(x - w / 2, plot.y + plot.h + 8, &label, AXIS, TICK_SCALE);
        }
        for &t in &yt {
            let y = py(t).round() as i64;
            canvas.line((plot.x, y), (plot.x + plot.w - 1, y), GRID, 1, None);
            let label = format!("{t:.yd$}");
            let w = text_width(&label, TICK_SCALE) as i64;
            canvas.line((plot.x - 5, y), (plot.x - 1, y), AXIS, 1, None);
            let half = (GLYPH_H * TICK_SCALE) as i64 / 2;
            canvas.text(plot.x - 9 - w, y - half + 1, &label, AXIS, TICK_SCALE);
        }
        canvas.stroke_rect(plot, AXIS);
        let xl_w = text_width(self.x_label, TEXT_SCALE) as i64;
        canvas.text(
            plot.x + (plot.w - xl_w) / 2,
            plot.y + plot.h + 14 + (GLYPH_H * TICK_SCALE) as i64,
            self.x_label,
            BLACK,
            TEXT_SCALE,
        );
        let yl_w = text_width(self.y_label, TEXT_SCALE) as i64;
        canvas.text_up(
            area.x + 8,
            plot.y + (plot.h + yl_w) / 2,
            self.y_label,
            BLACK,
            TEXT_SCALE,
        );

        canvas.set_clip(Some(Rect {
            x: plot.x + 1,
            y: plot.y + 1,
            w: plot.w - 2,
            h: plot.h - 2,
        }));
        for (k, sr) in series.iter().enumerate() {
            let color = sr.color.unwrap_or(PALETTE[k % PALETTE.len()]);
            let pts: Vec<(i64, i64)> = sr
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|&(x, y)| (px(x).round() as i64, py(y).round() as i64))
                .collect();
            let dash = (sr.style == Style::Dashed).then_some((8, 5));
            if sr.style != Style::Points {
                for pair in pts.windows(2) {
                    canvas.line(pair[0], pair[1], color, 2, dash);
                }
            }
            if matches!(sr.style, Style::Points | Style::LinePoints) {
                for &(x, y) in &pts {
                    canvas.disc(x, y, 3, color);
                }
            }
        }
        canvas.set_clip(None);
        self.draw_legend(canvas, plot, series);
    }

    fn draw_legend(&self, canvas: &mut Canvas, plot: Rect, series: &[Series]) {
        let named: Vec<(usize, &Series)> = series
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.name.is_empty())
            .collect();
        if named.is_empty() {
            return;
        }
        let sample = 28;
        let widest = named
            .iter()
            .map(|(_, s)| text_width(&s.name, TEXT_SCALE) as i64)
            .max()
            .unwrap_or(0);
        let w = widest + sample + 24;
        let h = named.len() as i64 * LINE_H + 8;
        let x = match self.legend {
            Corner::TopLeft => plot.x + 10,
            Corner::TopRight => plot.x + plot.w - 10 - w,
        };
        let y = plot.y + 10;
        let bx = Rect { x, y, w, h };
        canvas.fill_rect(bx, WHITE);
        canvas.stroke_rect(bx, DIAGONAL);
        for (row, (k, sr)) in named.iter().enumerate() {
            let color = sr.color.unwrap_or(PALETTE[k % PALETTE.len()]);
            let cy = y + 4 + row as i64 * LINE_H + LINE_H / 2 - 3;
            let dash = (sr.style == Style::Dashed).then_some((8, 5));
            if sr.style != Style::Points {
                canvas.line((x + 8, cy), (x + 8 + sample, cy), color, 2, dash);
            }
            if matches!(sr.style, Style::Points | Style::LinePoints) {
                canvas.disc(x + 8 + sample / 2, cy, 3, color);
            }
            canvas.text(
                x + 16 + sample,
                cy - (GLYPH_H * TEXT_SCALE) as i64 / 2 + 1,
                &sr.name,
                BLACK,
                TEXT_SCALE,
            );
        }
    }
}

/// Writes a line chart (e.g. train and valid loss against step) as a PNG, atomically.
/// Non-finite points are skipped; axes span the finite data, rounded to tick steps.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let panel = Panel {
        title,
        x_label,
        y_label,
        x_range: data_range(all().map(|p| p.0)),
        y_range: data_range(all().map(|p| p.1)),
        legend: Corner::TopRight,
    };
    let mut canvas = Canvas::new(900, 600, WHITE);
    let area = Rect {
        x: 0,
        y: 0,
        w: 900,
        h: 600,
    };
    panel.draw(&mut canvas, area, series);
    canvas.save(path)
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ReliabilityBin {
    /// Mean predicted probability of the class over the bin's rows.
    pub mean_predicted: f64,
    /// Share of the bin's rows whose true class is the class.
    pub observed: f64,
    pub rows: usize,
}

/// Equal-width bins of the predicted probability of `class`; empty bins are left out.
pub fn reliability_bins(
    preds: &[Probs],
    truth: &[Winner],
    class: usize,
    bins: usize,
) -> Vec<ReliabilityBin> {
    let mut sum_p = vec![0.0; bins];
    let mut hits = vec![0usize; bins];
    let mut rows = vec![0usize; bins];
    for (p, &t) in preds.iter().zip(truth) {
        let q = clip_and_normalise(p)[class];
        let b = ((q * bins as f64) as usize).min(bins - 1);
        sum_p[b] += q;
        rows[b] += 1;
        hits[b] += usize::from(t.index() == class);
    }
    (0..bins)
        .filter(|&b| rows[b] > 0)
        .map(|b| ReliabilityBin {
            mean_predicted: sum_p[b] / rows[b] as f64,
            observed: hits[b] as f64 / rows[b] as f64,
            rows: rows[b],
        })
        .collect()
}

/// Bins with fewer rows are left out of the diagram: their frequencies are mostly noise.
pub const MIN_BIN_ROWS: usize = 10;

/// Writes a reliability diagram as a PNG, atomically: one panel per class (A wins, B wins,
/// tie), each with the diagonal and one curve per prediction set in `sets` (e.g. "raw" and
/// "calibrated"), binned into `bins` equal-width bins of predicted probability.
pub fn reliability_diagram(
    path: &Path,
    title: &str,
    sets: &[(&str, &[Probs])],
    truth: &[Winner],
    bins: usize,
) -> Result<()> {
    if bins == 0 {
        bail!("a reliability diagram needs at least one bin");
    }
    if let Some((name, p)) = sets.iter().find(|(_, p)| p.len() != truth.len()) {
        bail!(
            "reliability diagram: '{name}' has {} rows but there are {} labels",
            p.len(),
            truth.len()
        );
    }
    let (panel_w, panel_h, header) = (520i64, 560i64, 40i64);
    let mut canvas = Canvas::new(3 * panel_w as usize, (panel_h + header) as usize, WHITE);
    let title_x = (3 * panel_w - text_width(title, TEXT_SCALE) as i64) / 2;
    canvas.text(title_x, 12, title, BLACK, TEXT_SCALE);
    const STYLES: [Style; 3] = [Style::Dashed, Style::LinePoints, Style::Points];
    for (class, name) in ["A wins", "B wins", "tie"].iter().enumerate() {
        let mut series = vec![Series::line("", vec![(0.0, 0.0), (1.0, 1.0)])
            .with_color(DIAGONAL)
            .with_style(Style::Line)];
        for (k, (label, preds)) in sets.iter().enumerate() {
            let pts = reliability_bins(preds, truth, class, bins)
                .iter()
                .filter(|b| b.rows >= MIN_BIN_ROWS)
                .map(|b| (b.mean_predicted, b.observed))
                .collect();
            series.push(Series {
                name: label.to_string(),
                points: pts,
                style: STYLES[k.min(STYLES.len() - 1)],
                color: Some(PALETTE[k % PALETTE.len()]),
            });
        }
        let panel_title = format!("class: {name}");
        let panel = Panel {
            title: &panel_title,
            x_label: "predicted probability",
            y_label: "observed frequency",
            x_range: (0.0, 1.0),
            y_range: (0.0, 1.0),
            legend: Corner::TopLeft,
        };
        let area = Rect {
            x: class as i64 * panel_w,
            y: header,
            w: panel_w,
            h: panel_h,
        };
        panel.draw(&mut canvas, area, &series);
    }
    canvas.save(path)
}
