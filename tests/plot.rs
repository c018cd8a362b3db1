//! PNG writer and charts: checksums against published values, and every file decoded back
//! by a small inflater written here (stored and fixed-Huffman blocks), so the tests need
//! no image library and no Python.

use verdict::data::Winner;
use verdict::plot::{
    adler32, crc32, line_chart, reliability_bins, reliability_diagram, zlib_compress, Canvas, Rect,
    Rgb, Series, Style, BLACK, WHITE,
};
use verdict::rng::Rng;

// ---------------------------------------------------------------------------------------
// A minimal inflater (RFC 1951 block types 00 and 01) used only to check our output.

struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    bit: u32,
}

impl BitReader<'_> {
    fn bit(&mut self) -> u32 {
        let b = (self.data[self.pos] >> self.bit) & 1;
        self.bit += 1;
        if self.bit == 8 {
            self.bit = 0;
            self.pos += 1;
        }
        b as u32
    }

    fn bits(&mut self, n: u32) -> u32 {
        (0..n).fold(0, |acc, i| acc | (self.bit() << i))
    }

    /// A Huffman code read most-significant bit first.
    fn code(&mut self, n: u32) -> u32 {
        (0..n).fold(0, |acc, _| (acc << 1) | self.bit())
    }
}

const LEN_BASE: [usize; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [u32; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DIST_BASE: [usize; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];

/// Fixed literal/length code (RFC 1951 §3.2.6): 7, 8 or 9 bits decided by the prefix.
fn fixed_symbol(r: &mut BitReader) -> usize {
    let c7 = r.code(7);
    if c7 <= 0x17 {
        return 256 + c7 as usize;
    }
    let c8 = (c7 << 1) | r.bit();
    match c8 {
        0x30..=0xBF => (c8 - 0x30) as usize,
        0xC0..=0xC7 => (280 + c8 - 0xC0) as usize,
        _ => (144 + ((c8 << 1) | r.bit()) - 0x190) as usize,
    }
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut r = BitReader {
        data,
        pos: 0,
        bit: 0,
    };
    let mut out = Vec::new();
    loop {
        let last = r.bit();
        match r.bits(2) {
            0 => {
                if r.bit != 0 {
                    r.bit = 0;
                    r.pos += 1;
                }
                let len = u16::from_le_bytes([data[r.pos], data[r.pos + 1]]) as usize;
                let nlen = u16::from_le_bytes([data[r.pos + 2], data[r.pos + 3]]) as usize;
                assert_eq!(len ^ 0xFFFF, nlen, "stored block LEN/NLEN");
                out.extend_from_slice(&data[r.pos + 4..r.pos + 4 + len]);
                r.pos += 4 + len;
            }
            1 => loop {
                let sym = fixed_symbol(&mut r);
                match sym {
                    0..=255 => out.push(sym as u8),
                    256 => break,
                    _ => {
                        let l = sym - 257;
                        let len = LEN_BASE[l] + r.bits(LEN_EXTRA[l]) as usize;
                        let d = r.code(5) as usize;
                        let extra = if d < 4 { 0 } else { (d as u32 - 2) / 2 };
                        let dist = DIST_BASE[d] + r.bits(extra) as usize;
                        assert!(dist <= out.len(), "distance {dist} before the start");
                        for _ in 0..len {
                            out.push(out[out.len() - dist]);
                        }
                    }
                }
            },
            t => panic!("block type {t} is not produced by our encoder"),
        }
        if last == 1 {
            return out;
        }
    }
}

fn zlib_decompress(z: &[u8]) -> Vec<u8> {
    assert_eq!(z[0], 0x78, "CMF: deflate with a 32 KiB window");
    assert_eq!((z[0] as u32 * 256 + z[1] as u32) % 31, 0, "FCHECK");
    let body = inflate(&z[2..z.len() - 4]);
    let stored = u32::from_be_bytes(z[z.len() - 4..].try_into().unwrap());
    assert_eq!(stored, adler32(&body), "Adler-32 trailer");
    body
}

/// Parses a PNG: checks the signature, chunk order and CRCs, and returns (width, height,
/// RGB pixels) after undoing the filter bytes (all of which must be 0 = None).
fn decode_png(png: &[u8]) -> (usize, usize, Vec<u8>) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "signature");
    let mut pos = 8;
    let mut kinds = Vec::new();
    let (mut width, mut height, mut idat) = (0, 0, Vec::new());
    while pos < png.len() {
        let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
        let kind: [u8; 4] = png[pos + 4..pos + 8].try_into().unwrap();
        let body = &png[pos + 8..pos + 8 + len];
        let crc = u32::from_be_bytes(png[pos + 8 + len..pos + 12 + len].try_into().unwrap());
        assert_eq!(crc, crc32(&png[pos + 4..pos + 8 + len]), "CRC of {kind:?}");
        match &kind {
            b"IHDR" => {
                assert_eq!(len, 13);
                width = u32::from_be_bytes(body[0..4].try_into().unwrap()) as usize;
                height = u32::from_be_bytes(body[4..8].try_into().unwrap()) as usize;
                assert_eq!(&body[8..], &[8, 2, 0, 0, 0], "8-bit RGB, no interlace");
            }
            b"IDAT" => idat.extend_from_slice(body),
            b"IEND" => assert_eq!(len, 0),
            other => panic!("unexpected chunk {other:?}"),
        }
        kinds.push(kind);
        pos += 12 + len;
    }
    assert_eq!(pos, png.len(), "trailing bytes");
    assert_eq!(kinds.first(), Some(b"IHDR"));
    assert_eq!(kinds.last(), Some(b"IEND"));
    let raw = zlib_decompress(&idat);
    assert_eq!(raw.len(), height * (width * 3 + 1), "scanline bytes");
    let mut rgb = Vec::with_capacity(width * height * 3);
    for line in raw.chunks(width * 3 + 1) {
        assert_eq!(line[0], 0, "filter type");
        rgb.extend_from_slice(&line[1..]);
    }
    (width, height, rgb)
}

// ---------------------------------------------------------------------------------------

#[test]
fn crc32_matches_published_check_values() {
    // The CRC catalogue's check value for CRC-32/ISO-HDLC, and the empty input.
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32(b""), 0);
    // The CRC of a PNG IEND chunk (type only), which every PNG file ends with.
    assert_eq!(crc32(b"IEND"), 0xAE42_6082);
}

#[test]
fn adler32_matches_published_values_and_long_inputs() {
    assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    assert_eq!(adler32(b""), 1);
    // Longer than the 5552-byte block where the modulo is deferred: compare with the
    // textbook per-byte definition.
    let data: Vec<u8> = (0..100_000u32)
        .map(|i| (i * 7 + i / 255) as u8 | 0x80)
        .collect();
    let (mut a, mut b) = (1u64, 0u64);
    for &x in &data {
        a = (a + x as u64) % 65_521;
        b = (b + a) % 65_521;
    }
    assert_eq!(adler32(&data), ((b << 16) | a) as u32);
}

#[test]
fn zlib_round_trips_text_noise_runs_and_edge_lengths() {
    let mut rng = Rng::new(3);
    let noise: Vec<u8> = (0..70_000).map(|_| rng.below(256) as u8).collect();
    let runs: Vec<u8> = (0..200_000).map(|i| ((i / 1000) % 3) as u8).collect();
    let text = b"the quick brown fox jumps over the lazy dog; ".repeat(500);
    // Long repeats at distances beyond 32 KiB must not reference outside the window.
    let mut far = noise[..40_000].to_vec();
    far.extend_from_slice(&noise[..40_000]);
    for data in [
        &b""[..],
        b"a",
        b"ab",
        b"aaa",
        &[7u8; 259],
        &[7u8; 258 * 3 + 2],
        &noise,
        &runs,
        &text,
        &far,
    ] {
        let z = zlib_compress(data);
        assert_eq!(
            zlib_decompress(&z),
            data,
            "round trip of {} bytes",
            data.len()
        );
    }
    assert!(
        zlib_compress(&runs).len() < runs.len() / 50,
        "runs should compress"
    );
}

#[test]
fn png_decodes_to_the_drawn_pixels() {
    let mut c = Canvas::new(37, 23, WHITE);
    c.fill_rect(
        Rect {
            x: 3,
            y: 4,
            w: 5,
            h: 6,
        },
        Rgb(10, 200, 30),
    );
    c.line((0, 22), (36, 0), Rgb(255, 0, 0), 1, None);
    c.text(12, 12, "Ag", BLACK, 1);
    let (w, h, rgb) = decode_png(&c.png());
    assert_eq!((w, h), (37, 23));
    for y in 0..h {
        for x in 0..w {
            let i = (y * w + x) * 3;
            assert_eq!(
                Rgb(rgb[i], rgb[i + 1], rgb[i + 2]),
                c.pixel(x, y),
                "pixel ({x},{y})"
            );
        }
    }
    assert_eq!(c.pixel(5, 6), Rgb(10, 200, 30));
    assert_eq!(c.pixel(0, 22), Rgb(255, 0, 0), "line start");
    assert_eq!(c.pixel(36, 0), Rgb(255, 0, 0), "line end");
    // 'A' top row is .###. : its first column is blank, the second is ink.
    assert_eq!(c.pixel(12, 12), WHITE);
    assert_eq!(c.pixel(13, 12), BLACK);
}

#[test]
fn clip_rectangle_keeps_lines_inside_the_axes() {
    let mut c = Canvas::new(20, 20, WHITE);
    let inner = Rect {
        x: 5,
        y: 5,
        w: 10,
        h: 10,
    };
    c.set_clip(Some(inner));
    c.line((0, 10), (19, 10), BLACK, 1, None);
    c.set_clip(None);
    assert_eq!(c.pixel(4, 10), WHITE, "left of the clip");
    assert_eq!(c.pixel(5, 10), BLACK);
    assert_eq!(c.pixel(14, 10), BLACK);
    assert_eq!(c.pixel(15, 10), WHITE, "right of the clip");
}

#[test]
fn line_chart_writes_a_decodable_png_with_the_series_colours() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loss.png");
    let train: Vec<(f64, f64)> = (0..100)
        .map(|i| (i as f64, 1.1 - 0.001 * i as f64))
        .collect();
    let valid = vec![(0.0, 1.09), (50.0, f64::NAN), (99.0, 1.02)];
    let series = [
        Series::line("train", train),
        Series::line("valid", valid).with_style(Style::LinePoints),
    ];
    line_chart(&path, "Loss", "step", "log loss", &series).unwrap();
    let (w, h, rgb) = decode_png(&std::fs::read(&path).unwrap());
    assert_eq!((w, h), (900, 600));
    let count = |c: Rgb| rgb.chunks(3).filter(|p| *p == [c.0, c.1, c.2]).count();
    let palette = verdict::plot::PALETTE;
    assert!(count(palette[0]) > 500, "train line drawn");
    assert!(count(palette[1]) > 200, "valid line drawn");
    assert!(count(BLACK) > 200, "title and labels drawn");
}

#[test]
fn line_chart_with_no_finite_points_still_draws_axes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.png");
    line_chart(
        &path,
        "Nothing yet",
        "step",
        "loss",
        &[Series::line("x", vec![(1.0, f64::NAN)])],
    )
    .unwrap();
    decode_png(&std::fs::read(&path).unwrap());
}

#[test]
fn reliability_bins_average_predictions_and_outcomes() {
    let preds = [
        [0.05, 0.5, 0.45],
        [0.15, 0.5, 0.35],
        [0.95, 0.0, 0.05],
        [0.91, 0.05, 0.04],
    ];
    let truth = [Winner::A, Winner::B, Winner::A, Winner::B];
    let bins = reliability_bins(&preds, &truth, 0, 10);
    assert_eq!(bins.len(), 3, "empty bins are left out: {bins:?}");
    assert_eq!(bins[0].rows, 1);
    assert!((bins[0].mean_predicted - 0.05).abs() < 1e-9);
    assert_eq!(bins[0].observed, 1.0);
    assert_eq!(bins[2].rows, 2, "0.95 and 0.91 share the last bin");
    assert!((bins[2].mean_predicted - 0.93).abs() < 1e-9);
    assert_eq!(bins[2].observed, 0.5);
}

#[test]
fn reliability_diagram_has_three_panels_and_refuses_misaligned_sets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rel.png");
    let preds = vec![[0.6, 0.3, 0.1]; 50];
    let truth = vec![Winner::A; 50];
    reliability_diagram(&path, "r", &[("raw", &preds), ("cal", &preds)], &truth, 10).unwrap();
    let (w, h, _) = decode_png(&std::fs::read(&path).unwrap());
    assert_eq!((w, h), (3 * 520, 600));
    let err = reliability_diagram(&path, "r", &[("raw", &preds[..49])], &truth, 10).unwrap_err();
    assert!(err.to_string().contains("'raw' has 49 rows"), "{err}");
}
