// tabhub browser client typings: placeholder.
export {};
